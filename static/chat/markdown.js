// Safe Markdown for model output, while it streams and at the end.
//
// markdown-it parses with raw HTML off; DOMPurify then keeps only a short
// allow-list of tags and attributes and enforces the link and image rules in
// its hooks, so even a parser bug cannot put script or a foreign request on
// the page. The result is a DOM fragment built in an inert document: nothing
// is fetched before the rules have run.
//
// Streaming: a reply is split at block boundaries (a blank line outside a
// code fence, followed by an unindented line). Blocks before the last
// boundary are rendered once and their DOM kept; only the unfinished tail is
// rendered again, at most once per animation frame. When the reply ends it
// is rendered once in full, so lists and references come out exactly as a
// reload would show them.
(() => {
  "use strict";

  const LINK_SCHEMES = /^(?:https?:|mailto:)/i;
  const TAGS = [
    "a", "p", "br", "hr", "h1", "h2", "h3", "h4", "h5", "h6", "ul", "ol", "li",
    "blockquote", "pre", "code", "em", "strong", "del", "s", "table", "thead",
    "tbody", "tr", "th", "td", "img", "span", "sup", "sub",
  ];
  const ATTRS = ["href", "title", "alt", "src", "class", "start"];
  const CLASS_OK = /^(?:language-[\w+#.-]{1,40}|image-link)$/;

  // Cost of rendering, for the performance budget (docs/ui.md).
  const stats = { renders: 0, totalMs: 0, maxMs: 0, fullRenders: 0, fullMs: 0 };

  function hostOf(url) {
    try {
      return new URL(url).hostname.toLowerCase();
    } catch (e) {
      return "";
    }
  }

  function safeHref(url) {
    const clean = String(url || "").replace(/[\u0000-\u0020\u007f-\u009f]/g, "");
    if (!LINK_SCHEMES.test(clean)) return "";
    if (/^mailto:/i.test(clean)) return clean;
    return hostOf(clean) ? clean : "";
  }

  function createRenderer({ imageHosts = [] } = {}) {
    const allowedHosts = new Set(imageHosts.map((h) => String(h).toLowerCase()));
    const imageAllowed = (src) => /^https?:/i.test(src) && allowedHosts.has(hostOf(src));

    const md = window.markdownit({ html: false, linkify: true, typographer: false });
    md.validateLink = (url) => safeHref(url) !== "";
    const escape = md.utils.escapeHtml;
    // A Markdown image from a host the operator did not allow is shown as a
    // link the user may follow, never fetched by the page.
    md.renderer.rules.image = (tokens, idx, options, env, self) => {
      const token = tokens[idx];
      const src = token.attrGet("src") || "";
      const alt = self.renderInlineAsText(token.children, options, env);
      if (imageAllowed(src)) {
        return `<img src="${escape(src)}" alt="${escape(alt)}">`;
      }
      const label = `Image: ${alt || hostOf(src) || "link"}`;
      return `<a href="${escape(src)}" class="image-link">${escape(label)}</a>`;
    };

    const purify = window.DOMPurify(window);
    purify.addHook("uponSanitizeAttribute", (node, data) => {
      if (data.attrName === "class") {
        data.attrValue = data.attrValue.split(/\s+/).filter((c) => CLASS_OK.test(c)).join(" ");
        if (!data.attrValue) data.keepAttr = false;
      }
    });
    purify.addHook("afterSanitizeAttributes", (node) => {
      if (node.nodeName === "A") {
        const href = safeHref(node.getAttribute("href"));
        if (href) {
          node.setAttribute("href", href);
          node.setAttribute("target", "_blank");
          node.setAttribute("rel", "noopener noreferrer nofollow");
        } else {
          node.removeAttribute("href");
        }
      } else if (node.nodeName === "IMG") {
        const src = node.getAttribute("src") || "";
        if (!imageAllowed(src)) {
          node.removeAttribute("src");
          node.setAttribute("alt", node.getAttribute("alt") || "image");
        }
        node.setAttribute("referrerpolicy", "no-referrer");
      }
    });
    const config = {
      ALLOWED_TAGS: TAGS,
      ALLOWED_ATTR: ATTRS.concat(["target", "rel", "referrerpolicy"]),
      ALLOWED_URI_REGEXP: /^(?:https?|mailto):/i,
      ALLOW_DATA_ATTR: false,
      RETURN_DOM_FRAGMENT: true,
    };

    function render(source) {
      const fragment = purify.sanitize(md.render(source), config);
      decorateCode(fragment);
      return fragment;
    }
    return { render };
  }

  // Code blocks get a header with their language and a Copy button; the
  // highlighter (loaded on first use) colours them once they are complete.
  function decorateCode(root) {
    for (const pre of root.querySelectorAll("pre")) {
      const code = pre.querySelector("code");
      const match = code && /language-([\w+#.-]+)/.exec(code.className);
      const wrap = document.createElement("div");
      wrap.className = "code-block";
      const head = document.createElement("div");
      head.className = "code-head";
      const lang = document.createElement("span");
      lang.textContent = match ? match[1] : "code";
      const copy = document.createElement("button");
      copy.type = "button";
      copy.className = "copy-code";
      copy.textContent = "Copy";
      copy.setAttribute("aria-label", `Copy ${match ? match[1] + " " : ""}code`);
      head.append(lang, copy);
      pre.replaceWith(wrap);
      wrap.append(head, pre);
    }
  }

  let hljsLoading = null;
  function highlight(root) {
    const blocks = [...root.querySelectorAll("pre code[class*='language-']:not(.hljs)")];
    if (!blocks.length) return;
    const src = document.getElementById("app")?.dataset.hljsSrc;
    if (!window.hljs && src && !hljsLoading) {
      hljsLoading = new Promise((resolve) => {
        const script = document.createElement("script");
        script.src = src;
        script.onload = resolve;
        script.onerror = resolve;
        document.head.appendChild(script);
      });
    }
    const run = () => {
      if (!window.hljs) return;
      for (const code of blocks) {
        const lang = /language-([\w+#.-]+)/.exec(code.className)[1];
        if (code.isConnected && window.hljs.getLanguage(lang)) window.hljs.highlightElement(code);
      }
    };
    if (window.hljs) run();
    else if (hljsLoading) hljsLoading.then(run);
  }

  // Where the text can be cut so that what comes before is complete blocks.
  // Scans only what arrived since the last call.
  class BlockScanner {
    constructor() {
      this.pos = 0;          // next unscanned character
      this.fence = null;     // the open fence's marker, e.g. "```"
      this.afterBlank = false;
      this.cut = 0;
    }

    feed(text) {
      let nl;
      while ((nl = text.indexOf("\n", this.pos)) !== -1) {
        const line = text.slice(this.pos, nl);
        const start = this.pos;
        this.pos = nl + 1;
        const fence = /^ {0,3}(`{3,}|~{3,})/.exec(line);
        if (this.fence) {
          if (fence && fence[1][0] === this.fence[0] && fence[1].length >= this.fence.length
              && !line.slice(fence[0].length).trim()) this.fence = null;
          continue;
        }
        if (!line.trim()) { this.afterBlank = true; continue; }
        if (this.afterBlank && /^\S/.test(line)) this.cut = start;
        this.afterBlank = false;
        if (fence) this.fence = fence[1];
      }
      return this.cut;
    }
  }

  // One reply's rendering: append text as it streams, finish once.
  class StreamView {
    constructor(el, renderer) {
      this.el = el;
      this.renderer = renderer;
      this.source = "";
      this.done = 0;
      this.scanner = new BlockScanner();
      this.tail = document.createElement("div");
      this.tail.className = "md-tail";
      this.el.replaceChildren(this.tail);
      this.frame = 0;
    }

    append(text) {
      this.source += text;
      if (!this.frame) this.frame = requestAnimationFrame(() => this.flush());
    }

    flush() {
      this.frame = 0;
      const t0 = performance.now();
      const cut = this.scanner.feed(this.source);
      if (cut > this.done) {
        const block = document.createElement("div");
        block.className = "md-block";
        block.appendChild(this.renderer.render(this.source.slice(this.done, cut)));
        this.el.insertBefore(block, this.tail);
        this.done = cut;
        highlight(block);
      }
      this.tail.replaceChildren(this.renderer.render(this.source.slice(this.done)));
      const ms = performance.now() - t0;
      stats.renders += 1;
      stats.totalMs += ms;
      stats.maxMs = Math.max(stats.maxMs, ms);
    }

    finish(text) {
      if (this.frame) cancelAnimationFrame(this.frame);
      this.frame = 0;
      if (typeof text === "string") this.source = text;
      renderAll(this.el, this.renderer, this.source);
    }
  }

  function renderAll(el, renderer, source) {
    const t0 = performance.now();
    el.replaceChildren(renderer.render(source));
    highlight(el);
    stats.fullRenders += 1;
    stats.fullMs += performance.now() - t0;
  }

  window.ChatMarkdown = { createRenderer, StreamView, renderAll, safeHref, stats };
})();
