// Replies as markdown: marked parses, DOMPurify sanitises (a model's output is untrusted
// HTML), highlight.js colours code blocks. While a reply streams only that reply is
// re-parsed, at most once a frame, and code is highlighted once it is complete.
import { Marked, Renderer } from "/vendor/marked.js";
import DOMPurify from "/vendor/purify.js";
import hljs from "/vendor/highlight.js";

const escapeHtml = (s) => s.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);

function parser(highlight) {
  return new Marked({
    gfm: true,
    renderer: {
      code({ text, lang }) {
        const language = (lang ?? "").trim().split(/\s+/)[0].toLowerCase();
        const known = language && hljs.getLanguage(language);
        const body = highlight && known ? hljs.highlight(text, { language, ignoreIllegals: true }).value : escapeHtml(text);
        const label = language ? `<span class="code-lang">${escapeHtml(language)}</span>` : "";
        return `<div class="code-block">${label}<pre><code class="hljs${known ? ` language-${escapeHtml(language)}` : ""}">${body}</code></pre></div>`;
      },
      // Wide tables scroll inside the message, never the page.
      table(token) {
        return `<div class="table-wrap">${Renderer.prototype.table.call(this, token)}</div>`;
      },
    },
  });
}
const streaming = parser(false);
const complete = parser(true);

// Links open in a new tab, without access to this page or its address.
DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A" && node.getAttribute("href")) {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer nofollow");
  }
});

/** Renders `text` into `el`; `done`: the reply is complete (highlight, add copy buttons). */
export function renderMarkdown(el, text, done) {
  const html = (done ? complete : streaming).parse(text);
  // No images or media from a model's output: a crafted image URL would send the
  // conversation to whoever the URL names the moment it renders.
  el.innerHTML = DOMPurify.sanitize(html, { USE_PROFILE: { html: true }, ADD_ATTR: ["target"], FORBID_TAGS: ["img", "picture", "source", "video", "audio", "form", "input", "button", "style"] });
  if (done) addCopyButtons(el);
}

function addCopyButtons(el) {
  for (const block of el.querySelectorAll(".code-block")) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "copy";
    button.textContent = "Copy";
    button.setAttribute("aria-label", "Copy code");
    button.addEventListener("click", async () => {
      try {
        await navigator.clipboard.writeText(block.querySelector("code").textContent);
        button.textContent = "Copied";
      } catch {
        button.textContent = "Copy failed";
      }
      setTimeout(() => (button.textContent = "Copy"), 1500);
    });
    block.append(button);
  }
}
