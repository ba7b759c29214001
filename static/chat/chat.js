// The chat page: one WebSocket speaking the SPEC's frames, a conversation
// list over the JSON API, and model text rendered only through ChatMarkdown
// (never inserted as raw HTML).
(() => {
  "use strict";
  const $ = (id) => document.getElementById(id);
  const app = $("app");
  const list = $("conversation-list");
  const listEmpty = $("list-empty");
  const moreBtn = $("list-more");
  const search = $("search");
  const messagesEl = $("messages");
  const scroller = $("scroller");
  const emptyState = $("empty-state");
  const form = $("composer");
  const input = $("input");
  const sendBtn = $("send");
  const stopBtn = $("stop");
  const errorEl = $("error");
  const errorText = $("error-text");
  const retryBtn = $("retry");
  const connEl = $("connection");
  const announcer = $("announcer");
  const confirmDialog = $("confirm-delete");
  const config = JSON.parse($("chat-config").textContent);
  const renderer = window.ChatMarkdown.createRenderer({ imageHosts: config.image_hosts });

  const state = {
    conversation: null,
    pending: null,       // a send waiting for chat.accepted: {frame, userEl, content}
    streaming: null,     // the reply arriving: {message, el, view, seq, model, text, resuming, stopRequested}
    socket: null,
    retryMs: 500,
    retry: null,         // what the Retry button does
    titleChecks: 0,
    titleTimer: 0,
    retryTimer: 0,       // the Retry button's countdown; ends with its notice
    connectedOnce: false,
    views: 0,            // counts conversations opened: a slower, older load is not shown
    refreshes: 0,        // counts refreshes of the one on screen: only the latest is shown
    listNext: null,      // the cursor of the list's next page, null on the last
    listPages: 1,        // pages of the list shown: a reload fetches as many again
    listLoads: 0,        // counts list loads: only the latest is shown
  };

  const TRANSIENT = new Set(["rate_limited", "timeout", "unavailable", "internal", "budget_exceeded"]);
  // Errors that answer a resume or a stop of the streaming reply: it will not go on.
  const STREAM_LOST = new Set(["not_found", "forbidden", "internal", "unavailable"]);
  const FINISH_WORDS = {
    cancelled: "Stopped",
    length: "Cut off at the length limit",
    moderated: "Withheld: this reply broke the usage policy",
  };

  function uuid() {
    if (crypto.randomUUID) return crypto.randomUUID();
    const b = crypto.getRandomValues(new Uint8Array(16));
    b[6] = (b[6] & 15) | 64; b[8] = (b[8] & 63) | 128;
    const h = [...b].map((x) => x.toString(16).padStart(2, "0")).join("");
    return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
  }

  function el(tag, attrs = {}, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (k === "class") node.className = v;
      else node.setAttribute(k, v);
    }
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // Material Design's "thumb up" (Apache-2.0); thumbs down is it turned over in CSS.
  const THUMB_PATH = "M2 21h4V9H2v12zm20-11c0-1.1-.9-2-2-2h-6.31l.95-4.57.03-.32c0-.41-.17-.79-.44-1.06L13.17 1 6.59 7.59C6.22 7.95 6 8.45 6 9v10c0 1.1.9 2 2 2h9c.83 0 1.54-.5 1.84-1.22l3.02-7.05c.09-.23.14-.47.14-.73v-2z";
  function thumbIcon() {
    const ns = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(ns, "svg");
    svg.setAttribute("viewBox", "0 0 24 24");
    svg.setAttribute("width", "16");
    svg.setAttribute("height", "16");
    svg.setAttribute("aria-hidden", "true");
    svg.setAttribute("focusable", "false");
    const path = document.createElementNS(ns, "path");
    path.setAttribute("d", THUMB_PATH);
    path.setAttribute("fill", "currentColor");
    svg.append(path);
    return svg;
  }

  function modelName(model) {
    if (!model) return "";
    return model.startsWith("demo:") ? "Demo model" : model;
  }

  function announce(text) {
    announcer.textContent = "";
    // A fresh text node makes screen readers read it even when it repeats.
    requestAnimationFrame(() => { announcer.textContent = text; });
  }

  // Every notice goes through here, so a countdown cannot outlive its own.
  function showError(text, retry = null, waitSeconds = 0) {
    clearTimeout(state.retryTimer);
    errorText.textContent = text || "";
    errorEl.hidden = !text;
    state.retry = retry;
    retryBtn.hidden = !retry;
    retryBtn.disabled = false;
    retryBtn.textContent = "Retry";
    if (retry && waitSeconds > 0) retryWhen(Date.now() + waitSeconds * 1000);
  }

  // Retry pressed before the server's retry_after would only be refused
  // again: it stays disabled, counting down, until then.
  function retryWhen(due) {
    const left = Math.ceil((due - Date.now()) / 1000);
    retryBtn.disabled = left > 0;
    retryBtn.textContent = left > 0 ? `Retry in ${left} s` : "Retry";
    if (left > 0) state.retryTimer = setTimeout(retryWhen, (due - Date.now()) % 1000 || 1000, due);
    else announce("You can retry now.");
  }

  function csrfToken() {
    const match = document.cookie.match(/(?:^|;\s*)csrftoken=([^;]+)/);
    return match ? decodeURIComponent(match[1]) : "";
  }

  async function api(method, url, body) {
    const options = { method, credentials: "same-origin", headers: {} };
    if (method !== "GET") options.headers["X-CSRFToken"] = csrfToken();
    if (body !== undefined) {
      options.headers["Content-Type"] = "application/json";
      options.body = JSON.stringify(body);
    }
    const res = await fetch(url, options);
    let data = null;
    if (res.status !== 204) {
      try { data = await res.json(); } catch (e) { data = null; }
    }
    if (!res.ok) {
      const message = data?.error?.message || "That did not work. Please try again.";
      throw Object.assign(new Error(message), { status: res.status });
    }
    return data;
  }

  function scrollToEnd() {
    scroller.scrollTop = scroller.scrollHeight;
  }

  function updateEmptyState() {
    emptyState.hidden = messagesEl.children.length > 0;
  }

  // ---- messages -----------------------------------------------------------

  function addMessage(m) {
    const li = el("li", { class: `message ${m.role}` });
    if (m.id) li.dataset.id = m.id;
    li.dataset.source = m.content || "";
    const who = el("span", { class: "visually-hidden" }, m.role === "user" ? "You said:" : "Reply:");
    const body = el("div", { class: m.role === "user" ? "content" : "content markdown" });
    li.append(who, body, el("div", { class: "meta" }), el("div", { class: "actions" }));
    if (m.role === "user") body.textContent = m.content || "";
    else if (m.content) window.ChatMarkdown.renderAll(body, renderer, m.content);
    messagesEl.appendChild(li);
    updateEmptyState();
    if (m.role === "assistant" && m.status !== "pending") {
      finishReply(li, {
        finish_reason: m.finish_reason, model: m.model, error_code: m.error_code,
        fallback: m.fallback, feedback: m.feedback,
      });
    } else if (m.role === "user") {
      userActions(li);
    }
    return li;
  }

  function userActions(li) {
    const actions = li.querySelector(".actions");
    actions.replaceChildren(
      el("button", { type: "button", class: "action copy-message", "aria-label": "Copy message" }, "Copy"),
      el("button", { type: "button", class: "action edit-message", "aria-label": "Edit message and resend" }, "Edit"),
    );
  }

  function finishReply(li, done) {
    li.classList.remove("streaming");
    li.removeAttribute("aria-busy");
    li.dataset.finish = done.finish_reason || "stop";
    const meta = li.querySelector(".meta");
    meta.replaceChildren();
    const name = modelName(done.model);
    if (name) {
      const badge = el("span", { class: "model-badge" + (done.model.startsWith("demo:") ? " demo" : "") }, name);
      badge.title = done.model;
      meta.append(badge);
    }
    if (done.fallback) meta.append(el("span", { class: "tag fallback" }, "Fallback answer"));
    if (FINISH_WORDS[done.finish_reason]) {
      meta.append(el("span", { class: "tag finish" }, FINISH_WORDS[done.finish_reason]));
    }
    if (done.finish_reason === "error") {
      meta.append(el("span", { class: "tag failed" }, done.error_message || "This reply failed."));
    }
    const actions = li.querySelector(".actions");
    actions.replaceChildren(
      el("button", { type: "button", class: "action copy-message", "aria-label": "Copy reply" }, "Copy"),
      el("button", { type: "button", class: "action regenerate", "aria-label": "Regenerate reply" }, "Regenerate"),
    );
    if (done.finish_reason !== "error") {
      const up = el("button", { type: "button", class: "action thumb up", "aria-label": "Good reply", "aria-pressed": "false" });
      const down = el("button", { type: "button", class: "action thumb down", "aria-label": "Bad reply", "aria-pressed": "false" });
      up.append(thumbIcon());
      down.append(thumbIcon());
      actions.append(up, down);
    }
    if (done.feedback) showRating(li, done.feedback.rating, done.feedback);
    refreshRegenerate();
  }

  // Only the last reply can be regenerated, and not while one is streaming.
  function refreshRegenerate() {
    const replies = messagesEl.querySelectorAll(".message.assistant");
    replies.forEach((reply, i) => {
      const btn = reply.querySelector(".regenerate");
      if (btn) btn.hidden = i !== replies.length - 1 || Boolean(state.streaming);
    });
    for (const btn of messagesEl.querySelectorAll(".edit-message")) btn.disabled = Boolean(state.streaming);
  }

  function setBusy(on) {
    stopBtn.hidden = !on;
    sendBtn.disabled = on;
    app.dataset.streaming = on ? "true" : "false";
    refreshRegenerate();
  }

  function startReply(frame, el_) {
    const li = el_ || addMessage({ role: "assistant", id: frame.message, status: "pending" });
    li.dataset.id = frame.message;
    li.classList.add("streaming");
    li.setAttribute("aria-busy", "true");
    const body = li.querySelector(".content");
    state.streaming = {
      message: frame.message,
      el: li,
      view: new window.ChatMarkdown.StreamView(body, renderer),
      seq: 0,
      model: frame.model || "",
      text: "",
    };
    setBusy(true);
    scrollToEnd();
    return state.streaming;
  }

  // ---- conversations ------------------------------------------------------

  function listUrl(cursor) {
    const params = new URLSearchParams();
    const q = search.value.trim();
    if (q) params.set("q", q);
    if (cursor) params.set("cursor", cursor);
    const qs = String(params);
    return "/api/conversations/" + (qs ? `?${qs}` : "");
  }

  function showListEnd(next) {
    state.listNext = next || null;  // an older server sends no `next`
    moreBtn.hidden = !state.listNext;
    moreBtn.disabled = false;
  }

  // The list from the top, as many pages as were shown: a fresh walk, so
  // conversations updated meanwhile move up and none shows twice.
  async function loadConversations() {
    const loading = ++state.listLoads;
    const found = [];
    let next = null;
    try {
      for (let page = 0; page < state.listPages; page++) {
        const data = await api("GET", listUrl(next));
        found.push(...data.conversations);
        next = data.next;
        if (!next) break;
      }
    } catch (e) {
      return;
    }
    if (loading !== state.listLoads) return;
    list.replaceChildren(...found.map(conversationItem));
    showListEnd(next);
    listEmpty.hidden = found.length > 0;
    listEmpty.textContent = search.value.trim() ? "No conversations match." : "No conversations yet.";
    // Titles come from a background job shortly after the first message.
    const current = found.find((c) => c.id === state.conversation);
    clearTimeout(state.titleTimer);
    if (current && !current.titled && state.titleChecks < 5) {
      state.titleChecks += 1;
      state.titleTimer = setTimeout(loadConversations, 2000);
    }
  }

  async function showMore() {
    const loading = ++state.listLoads;
    state.listPages += 1;  // a reload started from now on fetches this page too
    moreBtn.disabled = true;
    let data;
    try {
      data = await api("GET", listUrl(state.listNext));
    } catch (e) {
      state.listPages -= 1;
      if (loading === state.listLoads) moreBtn.disabled = false;
      showError(e.message);
      return;
    }
    if (loading !== state.listLoads) return;
    const items = data.conversations.map(conversationItem);
    list.append(...items);
    showListEnd(data.next);
    // The button may be gone: carry on from the first conversation it brought.
    items[0]?.querySelector(".conversation").focus();
    announce(`${items.length} more conversations.`);
  }

  function conversationItem(c) {
    const li = el("li", { class: "conv-item" });
    li.dataset.id = c.id;
    const open = el("button", { type: "button", class: "conversation" }, c.title);
    if (c.id === state.conversation) {
      li.classList.add("active");
      open.setAttribute("aria-current", "true");
    }
    open.addEventListener("click", () => openConversation(c.id));
    const rename = el("button", { type: "button", class: "icon rename", "aria-label": `Rename “${c.title}”` }, "✎");
    rename.addEventListener("click", () => startRename(li, c));
    const del = el("button", { type: "button", class: "icon delete", "aria-label": `Delete “${c.title}”` }, "✕");
    del.addEventListener("click", () => confirmDelete(c));
    li.append(open, rename, exportMenu(c), del);
    return li;
  }

  function exportMenu(c) {
    // A native disclosure: keyboard and screen readers work without script.
    const menu = el("details", { class: "conv-export" });
    menu.append(el("summary", { class: "icon export", "aria-label": `Download “${c.title}”` }, "⤓"));
    const links = el("div", { class: "conv-export-menu" });
    const base = `/api/conversations/${c.id}/export/?format=`;
    links.append(
      el("a", { href: base + "md", download: "", class: "export-md" }, "Markdown (.md)"),
      el("a", { href: base + "json", download: "", class: "export-json" }, "JSON (.json)"),
    );
    for (const a of links.children) a.addEventListener("click", () => { menu.open = false; });
    menu.append(links);
    return menu;
  }

  function startRename(li, c) {
    const field = el("input", { type: "text", class: "rename-input", maxlength: "200", "aria-label": "New title" });
    field.value = c.title;
    li.replaceChildren(field);
    field.focus();
    field.select();
    let finished = false;
    const finish = async (save) => {
      if (finished) return;
      finished = true;
      const title = field.value.trim();
      if (save && title && title !== c.title) {
        try {
          await api("PATCH", `/api/conversations/${c.id}/`, { title });
        } catch (e) {
          showError(e.message);
        }
      }
      await loadConversations();
      list.querySelector(`.conv-item[data-id="${c.id}"] .conversation`)?.focus();
    };
    field.addEventListener("keydown", (ev) => {
      if (ev.key === "Enter") { ev.preventDefault(); finish(true); }
      else if (ev.key === "Escape") { ev.preventDefault(); ev.stopPropagation(); finish(false); }
    });
    field.addEventListener("blur", () => finish(true));
  }

  function confirmDelete(c) {
    $("confirm-text").textContent = `“${c.title}” and all its messages will be deleted. This can't be undone.`;
    confirmDialog.returnValue = "";
    confirmDialog.onclose = async () => {
      confirmDialog.onclose = null;
      if (confirmDialog.returnValue !== "delete") return;
      try {
        await api("DELETE", `/api/conversations/${c.id}/`);
      } catch (e) {
        showError(e.message);
        return;
      }
      if (state.conversation === c.id) newChat();
      await loadConversations();
      announce("Conversation deleted.");
      input.focus();
    };
    confirmDialog.showModal();
  }

  function leaveStream() {
    // A reply streaming in the conversation we leave keeps going on the
    // server; coming back resumes it from the history.
    state.streaming = null;
    state.pending = null;
    setBusy(false);
  }

  async function openConversation(id) {
    const opening = ++state.views;
    let data;
    try {
      data = await api("GET", `/api/conversations/${id}/messages/`);
    } catch (e) {
      if (opening === state.views) showError("That conversation could not be opened.");
      return;
    }
    if (opening !== state.views) return;  // another conversation was opened since
    leaveStream();
    showError("");
    state.conversation = id;
    state.titleChecks = 0;
    history.replaceState(null, "", `/?c=${id}`);
    showHistory(data.messages);
    closeSidebar();
    scrollToEnd();
    loadConversations();
    input.focus();
  }

  function showHistory(messages) {
    messagesEl.replaceChildren();
    for (const m of messages) {
      const li = addMessage(m);
      if (m.role === "assistant" && m.status === "pending") {
        resume(startReply({ message: m.id, model: m.model }, li));
      }
    }
    updateEmptyState();
    refreshRegenerate();
  }

  // Another tab of ours began a reply in the conversation on screen: show it
  // as the history has it (its question, and without what an edit or a
  // regeneration there replaced), and follow the reply.
  async function followOtherTab(id) {
    // Not a new view: a conversation the user opens meanwhile must still show.
    const view = state.views;
    const refreshing = ++state.refreshes;
    let data;
    try {
      data = await api("GET", `/api/conversations/${id}/messages/`);
    } catch (e) {
      return;
    }
    const idle = !state.streaming && !state.pending && !messagesEl.querySelector(".edit-box");
    if (view !== state.views || refreshing !== state.refreshes) return;
    if (state.conversation !== id || !idle) return;
    const nearBottom = scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 120;
    showHistory(data.messages);
    if (nearBottom) scrollToEnd();
  }

  function newChat() {
    state.views += 1;  // a conversation still loading is not shown over the new chat
    leaveStream();
    state.conversation = null;
    messagesEl.replaceChildren();
    updateEmptyState();
    history.replaceState(null, "", "/");
    showError("");
    loadConversations();
    closeSidebar();
    input.focus();
  }

  // ---- the socket -----------------------------------------------------------

  function send(frame) {
    if (state.socket && state.socket.readyState === WebSocket.OPEN) {
      state.socket.send(JSON.stringify(frame));
      return true;
    }
    return false;
  }

  function resume(s) {
    // Until chat.done, an error answering this (the reply is gone, or its
    // server died and nobody can tell what became of it) ends the stream.
    s.resuming = true;
    return send({ type: "chat.resume", message: s.message, after: s.seq });
  }

  function requestStop(s) {
    s.stopRequested = true;
    const meta = s.el.querySelector(".meta");
    if (send({ type: "chat.stop", message: s.message })) {
      meta.textContent = "Stopping…";
      return;
    }
    // The socket is down: the stop is sent once it is back, after the resume.
    meta.textContent = "Will stop when the connection is back…";
    announce("Stop requested. It will be sent when the connection is back.");
  }

  function submit(frame, content) {
    showError("");
    if (!send(frame)) {
      showError("Not connected. Waiting for the connection to come back…", () => submit(frame, content));
      return false;
    }
    state.pending = { frame, content };
    setBusy(true);
    return true;
  }

  function sendMessage(content, editId) {
    const frame = { type: "chat.send", content, client_msg_id: uuid() };
    if (state.conversation) frame.conversation = state.conversation;
    if (editId) frame.edit = editId;
    if (!submit(frame, content)) return false;
    state.pending.edit = editId || null;
    state.pending.userEl = editId ? null : addMessage({ role: "user", content });
    scrollToEnd();
    return true;
  }

  function regenerate(replyId) {
    const frame = { type: "chat.send", client_msg_id: uuid(), conversation: state.conversation, regenerate: replyId };
    if (submit(frame)) state.pending.regenerate = replyId;
  }

  function onAccepted(frame) {
    const p = state.pending;
    if (!p || frame.client_msg_id !== p.frame.client_msg_id) return;
    state.pending = null;
    const isNew = state.conversation !== frame.conversation;
    state.conversation = frame.conversation;
    history.replaceState(null, "", `/?c=${frame.conversation}`);
    if (p.regenerate) {
      messagesEl.querySelector(`.message.assistant[data-id="${p.regenerate}"]`)?.remove();
    }
    if (p.edit) {
      // Editing replaces: the edited message and all after it leave the view.
      const edited = messagesEl.querySelector(`.message.user[data-id="${p.edit}"]`);
      while (edited && edited.nextElementSibling) edited.nextElementSibling.remove();
      edited?.remove();
      p.userEl = addMessage({ role: "user", content: p.content });
    }
    if (p.userEl) p.userEl.dataset.id = frame.user_message;
    const s = startReply(frame);
    if (frame.duplicate) resume(s);
    if (p.stop) send({ type: "chat.stop", message: frame.message });  // Stop pressed early
    s.el.querySelector(".meta").textContent = "Thinking…";
    announce("Reply started.");
    if (isNew) { state.titleChecks = 0; loadConversations(); }
  }

  function endStream(s, done) {
    // The text shown stays; the composer works again.
    s.view.finish(s.text);
    s.el.dataset.source = s.text;
    finishReply(s.el, done);
    state.streaming = null;
    setBusy(false);
  }

  function onDone(frame) {
    const s = state.streaming;
    if (!s || s.message !== frame.message) return;
    endStream(s, {
      finish_reason: frame.finish_reason,
      model: frame.model,
      fallback: Boolean(s.model && frame.model && frame.model !== s.model),
      error_message: s.error,
    });
    const words = FINISH_WORDS[frame.finish_reason];
    if (frame.finish_reason === "error") {
      showError(s.error || "The reply failed.", () => regenerate(frame.message));
      announce("The reply failed.");
    } else {
      announce(`${words ? words + ". " : "Reply complete. "}${s.text.slice(0, 1000)}`);
    }
    loadConversations();
  }

  function giveBack(p, text) {
    if (p.content && !p.edit && !input.value) input.value = p.content;
    showError(text);
    input.focus();
  }

  // A send to the conversation on screen was answered not_found. When the
  // conversation is gone (deleted in another tab or browser), every send
  // here would fail the same way: leave it for a new chat, with the text in
  // the box. Not sent for them: the new chat has none of the old one's
  // context, so whether the text still makes sense is theirs to say.
  async function leaveDeleted(p, text) {
    const id = p.frame.conversation;
    let gone = false;
    try {
      await api("GET", `/api/conversations/${id}/messages/`);
    } catch (e) {
      gone = e.status === 404;
    }
    if (!gone || state.conversation !== id) {
      giveBack(p, text);
      return;
    }
    newChat();
    if (p.content && !input.value) input.value = p.content;
    const where = input.value
      ? "Your message was not sent: it is in the box, and sending it starts a new chat."
      : "You are in a new chat.";
    showError(`This conversation was deleted, in another tab or browser. ${where}`);
  }

  function onError(frame) {
    let text = frame.message || "Something went wrong.";
    if (frame.retry_after) text += ` You can try again in ${frame.retry_after} s.`;
    const p = state.pending;
    if (p && frame.client_msg_id === p.frame.client_msg_id) {
      // Refused before it was stored: give the text back and, when waiting
      // may help, offer a retry.
      state.pending = null;
      p.userEl?.remove();
      updateEmptyState();
      setBusy(false);
      if (frame.code === "not_found" && p.frame.conversation && p.frame.conversation === state.conversation) {
        leaveDeleted(p, text);
        return;
      }
      if (!TRANSIENT.has(frame.code)) {
        giveBack(p, text);
        return;
      }
      const retry = () => {
        if (p.userEl) p.userEl = addMessage({ role: "user", content: p.content });
        if (submit(p.frame, p.content)) {
          Object.assign(state.pending, { userEl: p.userEl, edit: p.edit, regenerate: p.regenerate });
        }
      };
      showError(text, retry, frame.retry_after);
      return;
    }
    const s = state.streaming;
    if (s && frame.client_msg_id && !s.error) {
      s.error = text;  // the reply failed; chat.done follows
      return;
    }
    if (frame.code === "not_found" && s && !s.seq) {
      // Resuming a reply that no longer exists (deleted elsewhere).
      s.el.remove();
      leaveStream();
    } else if (s && !frame.client_msg_id && (s.resuming || s.stopRequested) && STREAM_LOST.has(frame.code)) {
      // The resume or stop was refused: no chat.done will come. Keep what
      // arrived, mark it failed and let the user write again.
      endStream(s, { finish_reason: "error", model: s.model, error_message: text });
      announce("The reply failed.");
      loadConversations();
    }
    showError(text);
  }

  function onFrame(frame) {
    switch (frame.type) {
      case "chat.accepted":
        onAccepted(frame);
        break;
      case "chat.queued": {
        const s = state.streaming;
        if (s && s.message === frame.message && !s.seq) {
          s.el.querySelector(".meta").textContent = `Waiting in line: position ${frame.position}`;
        }
        break;
      }
      case "chat.delta": {
        const s = state.streaming;
        // A resume replays from `after`; anything we already have is dropped.
        if (!s || s.message !== frame.message || frame.seq <= s.seq) return;
        if (frame.replace) {
          // A resume answered from storage: the whole text, instead of ours.
          s.seq = frame.seq;
          s.text = frame.text;
          s.view.finish(frame.text);
          break;
        }
        if (!s.seq) s.el.querySelector(".meta").textContent = "";
        s.seq = frame.seq;
        s.text += frame.text;
        s.view.append(frame.text);
        s.el.dataset.seq = s.seq;
        const nearBottom = scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 120;
        if (nearBottom) requestAnimationFrame(scrollToEnd);
        break;
      }
      case "chat.done":
        onDone(frame);
        break;
      case "chat.error":
        onError(frame);
        break;
      case "feedback.saved":
        onFeedbackSaved(frame);
        break;
      case "chat.started":
        // Another tab of ours began a reply: follow it here if it is on screen.
        if (frame.conversation === state.conversation && !state.streaming && !state.pending) {
          followOtherTab(frame.conversation);
        } else {
          loadConversations();
        }
        break;
      default:
        break;
    }
  }

  function setConnection(text) {
    connEl.textContent = text;
    connEl.classList.toggle("offline", Boolean(text));
  }

  function connect() {
    const proto = location.protocol === "https:" ? "wss" : "ws";
    const ws = new WebSocket(`${proto}://${location.host}/ws/chat/`);
    state.socket = ws;
    if (!state.connectedOnce) setConnection("Connecting…");
    ws.addEventListener("open", () => {
      state.connectedOnce = true;
      setConnection("");
      app.dataset.connected = "true";
      state.retryMs = 500;
      const s = state.streaming;
      if (s) {
        resume(s);
        if (s.stopRequested) requestStop(s);  // pressed while we were away, or lost with the socket
      }
      if (state.pending) {
        // The send may or may not have arrived: the same client_msg_id is
        // answered once, so sending it again is safe.
        send(state.pending.frame);
      }
    });
    ws.addEventListener("message", (ev) => {
      let frame;
      try { frame = JSON.parse(ev.data); } catch (e) { return; }
      onFrame(frame);
    });
    ws.addEventListener("close", (ev) => {
      if (state.socket !== ws) return;
      app.dataset.connected = "false";
      if (ev.code === 4401) {
        // This session signed out (in another tab): a new socket would not be ours.
        setConnection("Signed out");
        showError("You signed out. Reload the page to sign in again.");
        return;
      }
      setConnection("Connection lost. Reconnecting…");
      setTimeout(connect, state.retryMs);
      state.retryMs = Math.min(state.retryMs * 2, 8000);
    });
  }

  // ---- feedback -------------------------------------------------------------

  function showRating(li, rating, detail = {}) {
    li.dataset.rating = String(rating || 0);
    for (const btn of li.querySelectorAll(".thumb")) {
      const mine = (btn.classList.contains("up") && rating === 1) || (btn.classList.contains("down") && rating === -1);
      btn.setAttribute("aria-pressed", mine ? "true" : "false");
    }
    li.feedback = { rating, reasons: detail.reasons || [], comment: detail.comment || "" };
  }

  function rate(li, rating, reasons = [], comment = "") {
    const id = Number(li.dataset.id);
    const frame = { type: "feedback", message: id, rating, reasons, comment };
    if (!send(frame)) {
      showError("Not connected. Your rating was not saved.", () => rate(li, rating, reasons, comment));
      return;
    }
    showRating(li, rating, { reasons, comment });
  }

  function onFeedbackSaved(frame) {
    const li = messagesEl.querySelector(`.message.assistant[data-id="${frame.message}"]`);
    if (!li) return;
    li.dataset.saved = String(frame.rating || 0);  // a withdrawn rating comes back as null
    const panel = li.querySelector(".feedback-panel");
    if (panel && panel.dataset.submitted === "true") {
      panel.remove();
      li.querySelector(".thumb[aria-pressed='true']")?.focus();
    }
    announce(frame.rating ? "Thanks for your feedback." : "Rating removed.");
  }

  function openFeedbackPanel(li, rating) {
    li.querySelector(".feedback-panel")?.remove();
    const reasons = rating === 1 ? config.reasons_up : config.reasons_down;
    const panel = el("form", { class: "feedback-panel", "aria-label": rating === 1 ? "What was good?" : "What went wrong?" });
    const legend = el("p", { class: "feedback-title" }, rating === 1 ? "What was good? (optional)" : "What went wrong? (optional)");
    const chips = el("div", { class: "chips", role: "group", "aria-label": "Reasons" });
    const chosen = new Set(li.feedback?.rating === rating ? li.feedback.reasons : []);
    for (const reason of reasons) {
      const chip = el("button", { type: "button", class: "chip", "aria-pressed": chosen.has(reason) ? "true" : "false" }, reason.replace(/_/g, " "));
      chip.dataset.reason = reason;
      chip.addEventListener("click", () => {
        chip.setAttribute("aria-pressed", chip.getAttribute("aria-pressed") === "true" ? "false" : "true");
      });
      chips.append(chip);
    }
    const commentId = `comment-${li.dataset.id}`;
    const label = el("label", { for: commentId, class: "visually-hidden" }, "Comment (optional)");
    const comment = el("textarea", {
      id: commentId, class: "feedback-comment", rows: "2",
      maxlength: String(config.comment_max_chars), placeholder: "Add a comment (optional)",
    });
    comment.value = li.feedback?.rating === rating ? li.feedback.comment : "";
    const submitBtn = el("button", { type: "submit", class: "button primary" }, "Send feedback");
    const cancel = el("button", { type: "button", class: "button ghost" }, "Close");
    cancel.addEventListener("click", () => { panel.remove(); li.querySelector(".thumb[aria-pressed='true']")?.focus(); });
    panel.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const picked = [...chips.querySelectorAll(".chip[aria-pressed='true']")].map((c) => c.dataset.reason);
      panel.dataset.submitted = "true";
      rate(li, rating, picked, comment.value.trim());
    });
    panel.append(legend, chips, label, comment, el("div", { class: "panel-actions" }, undefined));
    panel.querySelector(".panel-actions").append(submitBtn, cancel);
    li.append(panel);
    chips.querySelector(".chip")?.focus();
  }

  function onThumb(li, btn) {
    const rating = btn.classList.contains("up") ? 1 : -1;
    if (btn.getAttribute("aria-pressed") === "true") {
      // Pressing the chosen thumb again withdraws the rating.
      li.querySelector(".feedback-panel")?.remove();
      rate(li, 0);
      return;
    }
    rate(li, rating);
    openFeedbackPanel(li, rating);
  }

  // ---- message actions --------------------------------------------------------

  async function copyText(text, btn) {
    try {
      await navigator.clipboard.writeText(text);
      const old = btn.textContent;
      btn.textContent = "Copied";
      announce("Copied to the clipboard.");
      setTimeout(() => { btn.textContent = old; }, 1500);
    } catch (e) {
      showError("Copying is not allowed in this browser.");
    }
  }

  function startEdit(li) {
    if (state.streaming || state.pending) return;
    const original = li.dataset.source;
    const body = li.querySelector(".content");
    const area = el("textarea", { class: "edit-input", rows: "3", "aria-label": "Edit your message", maxlength: app.dataset.maxChars });
    area.value = original;
    const save = el("button", { type: "button", class: "button primary" }, "Save and send");
    const cancel = el("button", { type: "button", class: "button ghost" }, "Cancel");
    const box = el("div", { class: "edit-box" });
    box.append(area, el("div", { class: "panel-actions" }));
    box.lastChild.append(save, cancel);
    body.hidden = true;
    li.querySelector(".actions").hidden = true;
    li.insertBefore(box, body);
    area.focus();
    const close = () => { box.remove(); body.hidden = false; li.querySelector(".actions").hidden = false; };
    cancel.addEventListener("click", () => { close(); li.querySelector(".edit-message")?.focus(); });
    const go = () => {
      const text = area.value;
      if (!text.trim()) return;
      close();
      sendMessage(text, Number(li.dataset.id));
    };
    save.addEventListener("click", go);
    area.addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) { ev.preventDefault(); go(); }
      else if (ev.key === "Escape") { ev.preventDefault(); ev.stopPropagation(); cancel.click(); }
    });
  }

  messagesEl.addEventListener("click", (ev) => {
    const btn = ev.target.closest("button");
    if (!btn) return;
    const li = btn.closest(".message");
    if (btn.classList.contains("copy-code")) {
      copyText(btn.closest(".code-block").querySelector("code").textContent, btn);
    } else if (btn.classList.contains("copy-message")) {
      copyText(li.dataset.source || "", btn);
    } else if (btn.classList.contains("regenerate")) {
      if (!state.streaming && !state.pending) regenerate(Number(li.dataset.id));
    } else if (btn.classList.contains("edit-message")) {
      startEdit(li);
    } else if (btn.classList.contains("thumb")) {
      onThumb(li, btn);
    }
  });

  // ---- composer and keys ----------------------------------------------------

  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const content = input.value;
    if (!content.trim() || state.streaming || state.pending) return;
    if (sendMessage(content)) input.value = "";
  });

  input.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      form.requestSubmit();
    }
  });

  // Escape in another text field is that field's (the search box clears
  // itself); it stops the reply from the message box or from outside a field.
  const typingElsewhere = (target) =>
    target !== input && target instanceof Element && target.matches("input, textarea, select, [contenteditable]");

  document.addEventListener("keydown", (ev) => {
    if (ev.key === "Escape" && app.classList.contains("sidebar-open")) {
      closeSidebar();
      toggle.focus();
    } else if (ev.key === "Escape" && (state.streaming || state.pending) && !confirmDialog.open && !typingElsewhere(ev.target)) {
      ev.preventDefault();
      stopBtn.click();
    }
  });

  stopBtn.addEventListener("click", () => {
    if (state.streaming) requestStop(state.streaming);
    else if (state.pending) state.pending.stop = true;
    input.focus();
  });

  retryBtn.addEventListener("click", () => {
    const retry = state.retry;
    showError("");
    if (retry) retry();
  });

  $("new-chat").addEventListener("click", newChat);
  moreBtn.addEventListener("click", showMore);

  let searchTimer = 0;
  search.addEventListener("input", () => {
    clearTimeout(searchTimer);
    state.listPages = 1;
    searchTimer = setTimeout(loadConversations, 200);
  });

  const toggle = $("toggle-sidebar");
  function closeSidebar() {
    app.classList.remove("sidebar-open");
    toggle.setAttribute("aria-expanded", "false");
  }
  toggle.addEventListener("click", () => {
    const open = !app.classList.contains("sidebar-open");
    app.classList.toggle("sidebar-open", open);
    toggle.setAttribute("aria-expanded", open ? "true" : "false");
    if (open) $("new-chat").focus();
  });

  if (app.dataset.demo === "true") app.classList.add("demo");
  updateEmptyState();
  connect();
  const initial = Number(new URLSearchParams(location.search).get("c"));
  if (initial) openConversation(initial); else loadConversations();
  input.focus();
})();
