// The chat page: one WebSocket, the SPEC's frames, model text inserted as text.
(() => {
  "use strict";
  const app = document.getElementById("app");
  const list = document.getElementById("conversation-list");
  const messagesEl = document.getElementById("messages");
  const form = document.getElementById("composer");
  const input = document.getElementById("input");
  const sendBtn = document.getElementById("send");
  const stopBtn = document.getElementById("stop");
  const errorEl = document.getElementById("error");
  const connEl = document.getElementById("connection");
  const isDemo = app.dataset.demo === "true";

  const state = {
    conversation: null,
    pendingSend: null,   // {client_msg_id, content}
    streaming: null,     // {message, el, seq}
    socket: null,
    retryMs: 500,
  };

  const ERRORS = {
    timeout: "The model took too long to answer.",
    unavailable: "The model is unavailable right now.",
    rate_limited: "You are sending messages too quickly.",
  };

  function uuid() {
    if (crypto.randomUUID) return crypto.randomUUID();
    const b = crypto.getRandomValues(new Uint8Array(16));
    b[6] = (b[6] & 15) | 64; b[8] = (b[8] & 63) | 128;
    const h = [...b].map((x) => x.toString(16).padStart(2, "0")).join("");
    return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
  }

  function showError(text) {
    errorEl.textContent = text;
    errorEl.hidden = !text;
  }

  function addMessage(role, text, extra = {}) {
    const li = document.createElement("li");
    li.className = `message ${role}`;
    if (extra.id) li.dataset.id = extra.id;
    const body = document.createElement("div");
    body.className = "content";
    body.textContent = text;  // never HTML: model output is untrusted
    li.appendChild(body);
    const meta = document.createElement("div");
    meta.className = "meta";
    li.appendChild(meta);
    messagesEl.appendChild(li);
    if (extra.finish_reason) markFinished(li, extra.finish_reason, extra.model, extra.error_code);
    li.scrollIntoView({ block: "end" });
    return li;
  }

  function markFinished(li, reason, model, errorCode) {
    const meta = li.querySelector(".meta");
    const bits = [];
    if (model) bits.push(model.startsWith("demo:") ? "demo model" : model);
    if (reason === "cancelled") bits.push("stopped");
    if (reason === "length") bits.push("cut at the length limit");
    if (reason === "moderated") bits.push("withheld by moderation");
    if (reason === "error") bits.push(ERRORS[errorCode] || "failed");
    meta.textContent = bits.join(" · ");
    li.dataset.finish = reason;
  }

  function setStreaming(on) {
    stopBtn.hidden = !on;
    sendBtn.disabled = on;
  }

  async function loadConversations() {
    const res = await fetch("/api/conversations/", { credentials: "same-origin" });
    if (!res.ok) return;
    const data = await res.json();
    list.replaceChildren();
    for (const c of data.conversations) {
      const li = document.createElement("li");
      const btn = document.createElement("button");
      btn.type = "button";
      btn.textContent = c.title;
      btn.className = "conversation" + (c.id === state.conversation ? " active" : "");
      btn.addEventListener("click", () => openConversation(c.id));
      li.appendChild(btn);
      list.appendChild(li);
    }
  }

  async function openConversation(id) {
    const res = await fetch(`/api/conversations/${id}/messages/`, { credentials: "same-origin" });
    if (!res.ok) { showError("That conversation could not be opened."); return; }
    const data = await res.json();
    state.conversation = id;
    history.replaceState(null, "", `/?c=${id}`);
    messagesEl.replaceChildren();
    for (const m of data.messages) {
      const li = addMessage(m.role, m.content, { id: m.id, finish_reason: m.status === "finished" && m.role === "assistant" ? m.finish_reason : "", model: m.model, error_code: m.error_code });
      if (m.role === "assistant" && m.status === "pending") {
        state.streaming = { message: m.id, el: li, seq: 0, text: "" };
        li.querySelector(".content").textContent = "";
        setStreaming(true);
        send({ type: "chat.resume", message: m.id, after: 0 });
      }
    }
    loadConversations();
    input.focus();
  }

  function send(frame) {
    if (state.socket && state.socket.readyState === WebSocket.OPEN) {
      state.socket.send(JSON.stringify(frame));
      return true;
    }
    return false;
  }

  function onFrame(frame) {
    switch (frame.type) {
      case "chat.accepted": {
        if (!state.pendingSend || frame.client_msg_id !== state.pendingSend.client_msg_id) return;
        state.pendingSend = null;
        const isNew = state.conversation !== frame.conversation;
        state.conversation = frame.conversation;
        history.replaceState(null, "", `/?c=${frame.conversation}`);
        const el = addMessage("assistant", "", { id: frame.message });
        el.classList.add("streaming");
        state.streaming = { message: frame.message, el, seq: 0 };
        if (isNew) loadConversations();
        break;
      }
      case "chat.queued": {
        if (state.streaming && state.streaming.message === frame.message) {
          state.streaming.el.querySelector(".meta").textContent = `Waiting in line (position ${frame.position})…`;
        }
        break;
      }
      case "chat.delta": {
        const s = state.streaming;
        if (!s || s.message !== frame.message || frame.seq <= s.seq) return;
        s.seq = frame.seq;
        const body = s.el.querySelector(".content");
        body.appendChild(document.createTextNode(frame.text));
        s.el.querySelector(".meta").textContent = "";
        s.el.scrollIntoView({ block: "end" });
        break;
      }
      case "chat.done": {
        const s = state.streaming;
        if (!s || s.message !== frame.message) return;
        s.el.classList.remove("streaming");
        markFinished(s.el, frame.finish_reason, frame.model, s.errorCode);
        state.streaming = null;
        setStreaming(false);
        loadConversations();
        break;
      }
      case "chat.error": {
        if (state.streaming) state.streaming.errorCode = frame.code;
        if (state.pendingSend && frame.client_msg_id === state.pendingSend.client_msg_id) {
          input.value = state.pendingSend.content;  // give the text back to fix and resend
          state.pendingSend = null;
          setStreaming(false);
        }
        let text = frame.message || "Something went wrong.";
        if (frame.retry_after) text += ` Try again in ${frame.retry_after} s.`;
        showError(text);
        break;
      }
      default:
        break;
    }
  }

  function connect() {
    const proto = location.protocol === "https:" ? "wss" : "ws";
    const ws = new WebSocket(`${proto}://${location.host}/ws/chat/`);
    state.socket = ws;
    connEl.textContent = "Connecting…";
    ws.addEventListener("open", () => {
      connEl.textContent = "";
      app.dataset.connected = "true";
      state.retryMs = 500;
      if (state.streaming) send({ type: "chat.resume", message: state.streaming.message, after: state.streaming.seq });
    });
    ws.addEventListener("message", (ev) => {
      try { onFrame(JSON.parse(ev.data)); } catch (e) { console.error(e); }
    });
    ws.addEventListener("close", () => {
      app.dataset.connected = "false";
      connEl.textContent = "Reconnecting…";
      setTimeout(connect, state.retryMs);
      state.retryMs = Math.min(state.retryMs * 2, 8000);
    });
  }

  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const content = input.value;
    if (!content.trim() || state.streaming) return;
    showError("");
    const client_msg_id = uuid();
    const frame = { type: "chat.send", content, client_msg_id };
    if (state.conversation) frame.conversation = state.conversation;
    if (!send(frame)) { showError("Not connected yet. Please wait a moment and try again."); return; }
    state.pendingSend = { client_msg_id, content };
    addMessage("user", content);
    input.value = "";
    setStreaming(true);
  });

  input.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      form.requestSubmit();
    } else if (ev.key === "Escape" && state.streaming) {
      stopBtn.click();
    }
  });

  stopBtn.addEventListener("click", () => {
    if (state.streaming) send({ type: "chat.stop", message: state.streaming.message });
  });

  document.getElementById("new-chat").addEventListener("click", () => {
    state.conversation = null;
    messagesEl.replaceChildren();
    history.replaceState(null, "", "/");
    showError("");
    loadConversations();
    input.focus();
  });

  if (isDemo) app.classList.add("demo");
  connect();
  const initial = Number(new URLSearchParams(location.search).get("c"));
  if (initial) openConversation(initial); else loadConversations();
})();
