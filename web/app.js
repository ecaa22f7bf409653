// The chat page: conversations (store.js), the server (connection.js), replies rendered as
// markdown (markdown.js). Data flows one way: a user action changes the conversation,
// which is saved and redrawn; a streamed reply changes only its own message element.
import { Connection, fetchModels, KeyRequired, setApiKey } from "/connection.js";
import { renderMarkdown } from "/markdown.js";
import { currentId, exportJson, loadAll, newConversation, parseImport, saveAll, setCurrentId, titleFrom } from "/store.js";

const $ = (id) => document.getElementById(id);
const log = $("log"), input = $("input"), modelSelect = $("model"), statusLine = $("status");
const sendButton = $("send"), stopButton = $("stop");
const SETTINGS = ["system", "temperature", "top_p", "top_k", "max_tokens", "seed", "stop"];
const NUMERIC = new Set(["temperature", "top_p", "top_k", "max_tokens", "seed"]);

let conversations = loadAll();
let conv = null;
let models = [];
/** The reply being streamed, or null. */
let reply = null;
/** Index of the user message being edited, or null. */
let editing = null;
let nextId = 1;

const setStatus = (text) => (statusLine.textContent = text);

const connection = new Connection({
  onFrame,
  onStatus: setStatus,
  onClosed: (reason) => {
    setStatus(`disconnected: ${reason}`);
    if (reply) finish({ problem: reason === "disconnected" ? "The connection to the server closed." : `The connection closed: ${reason}.` });
  },
  onKeyRefused: (message) => askForKey(`The server refused this key: ${message}`),
});

// --- conversations ---------------------------------------------------------------------

function save() {
  conv.updatedAt = Date.now();
  conversations.sort((a, b) => b.updatedAt - a.updatedAt);
  if (!saveAll(conversations)) setStatus("could not save: this browser's storage is full (export and delete old conversations)");
  renderSidebar();
}

function open(c) {
  if (reply) return;
  conv = c;
  editing = null;
  setCurrentId(c.id);
  fillSettings();
  renderSidebar();
  renderLog();
  closeSidebarOnPhone();
}

function startNew() {
  if (reply) return;
  const c = newConversation({ model: conv?.settings.model });
  conversations.unshift(c);
  open(c);
  input.focus();
}

function renderSidebar() {
  const q = $("search").value.trim().toLowerCase();
  const list = $("conversations");
  const shown = conversations.filter((c) => !q || c.title.toLowerCase().includes(q) || c.messages.some((m) => m.content.toLowerCase().includes(q)));
  list.replaceChildren(
    ...shown.map((c) => {
      const li = document.createElement("li");
      li.className = "conv";
      const pick = button(c.title, "", () => open(c));
      pick.className = "conv-title";
      if (c === conv) pick.setAttribute("aria-current", "true");
      const rename = button("✎", `Rename ${c.title}`, () => {
        const title = prompt("Rename the conversation", c.title);
        if (title?.trim()) {
          c.title = title.trim();
          save();
        }
      });
      const del = button("✕", `Delete ${c.title}`, () => {
        if (reply && c === conv) return;
        if (!confirm(`Delete "${c.title}"?`)) return;
        conversations = conversations.filter((x) => x !== c);
        saveAll(conversations);
        if (c === conv) (conversations[0] ? open(conversations[0]) : startNew());
        else renderSidebar();
      });
      rename.className = del.className = "icon small";
      li.append(pick, rename, del);
      return li;
    }),
  );
}

function button(text, label, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = text;
  if (label) b.setAttribute("aria-label", label);
  b.addEventListener("click", onClick);
  return b;
}

// --- settings --------------------------------------------------------------------------

function fillSettings() {
  for (const k of SETTINGS) {
    const v = conv.settings[k];
    $(`set-${k}`).value = v === undefined ? "" : k === "stop" ? v.join("\n") : String(v);
  }
  if (conv.settings.model && [...modelSelect.options].some((o) => o.value === conv.settings.model)) modelSelect.value = conv.settings.model;
}

function readSetting(k) {
  const raw = $(`set-${k}`).value;
  if (k === "stop") {
    const lines = raw.split("\n").filter((l) => l !== "");
    return lines.length ? lines : undefined;
  }
  if (raw.trim() === "") return undefined;
  return NUMERIC.has(k) ? Number(raw) : raw;
}

$("settings").addEventListener("input", () => {
  for (const k of SETTINGS) {
    const v = readSetting(k);
    if (v === undefined || (typeof v === "number" && Number.isNaN(v))) delete conv.settings[k];
    else conv.settings[k] = v;
  }
  save();
});
$("settings").addEventListener("submit", (e) => e.preventDefault());

function requestBody() {
  const s = conv.settings;
  const messages = [];
  if (s.system) messages.push({ role: "system", content: s.system });
  // Turns that failed or were stopped stay on screen but out of the model's context, unless included.
  for (const m of conv.messages) if (!m.excluded && m !== reply?.msg) messages.push({ role: m.role, content: m.content });
  const body = { model: modelSelect.value, messages, stream_options: { include_usage: true } };
  for (const k of ["temperature", "top_p", "top_k", "max_tokens", "seed", "stop"]) if (s[k] !== undefined) body[k] = s[k];
  return body;
}

// --- the log ---------------------------------------------------------------------------

function renderLog() {
  log.replaceChildren(...conv.messages.map((m, i) => messageEl(m, i)));
  log.scrollTop = log.scrollHeight;
}

function messageEl(m, index) {
  const el = document.createElement("article");
  el.className = `msg ${m.role}${m.status ? ` ${m.status}` : ""}${m.excluded ? " excluded" : ""}`;
  el.setAttribute("aria-label", m.role === "user" ? "You" : "Assistant");
  if (m.role === "assistant") {
    const details = document.createElement("details");
    details.className = "thinking";
    details.hidden = !m.reasoning;
    const summary = document.createElement("summary");
    summary.textContent = "Thinking";
    const thoughts = document.createElement("div");
    thoughts.className = "reasoning-text";
    thoughts.textContent = m.reasoning ?? "";
    details.append(summary, thoughts);
    el.append(details);
  }
  const text = document.createElement("div");
  text.className = "text";
  if (m.role === "assistant") renderMarkdown(text, m.content, true);
  else text.textContent = m.content;
  el.append(text);
  if (m.role === "assistant" && (m.stats || m.status)) el.append(metaEl(m));
  const actions = actionsFor(m, index);
  if (actions.length) {
    const bar = document.createElement("div");
    bar.className = "actions";
    bar.append(...actions);
    el.append(bar);
  }
  return el;
}

function metaEl(m) {
  const meta = document.createElement("div");
  meta.className = "meta";
  const s = m.stats ?? {};
  const parts = [];
  if (m.status === "stopped") parts.push("stopped");
  else if (m.status === "error") parts.push(m.error);
  else parts.push(`finish: ${s.finish ?? "?"}`);
  if (s.completionTokens !== undefined) parts.push(`${s.completionTokens} tokens${s.promptTokens !== undefined ? ` (prompt ${s.promptTokens})` : ""}`);
  if (s.ttftMs !== undefined) parts.push(`TTFT ${Math.round(s.ttftMs)} ms`);
  if (s.tokensPerSecond !== undefined) parts.push(`${s.tokensPerSecond.toFixed(1)} tokens/s`);
  meta.textContent = parts.join(" · ");
  meta.dataset.finish = s.finish ?? "";
  return meta;
}

function actionsFor(m, index) {
  const out = [];
  const last = index === conv.messages.length - 1;
  if (m.excluded && m.role === "assistant") {
    out.push(button("Include in context", "Send this turn with the next one", () => setExcluded(index, false)));
  } else if (m.status && m.role === "assistant") {
    out.push(button("Leave out of context", "Do not send this turn with the next one", () => setExcluded(index, true)));
  }
  if (last && m.role === "assistant") out.push(button("Regenerate", "Regenerate this reply", regenerate));
  const lastUser = conv.messages.map((x) => x.role).lastIndexOf("user");
  if (index === lastUser) out.push(button("Edit", "Edit and resend this message", () => edit(index)));
  for (const b of out) b.className = "link";
  return out;
}

/** A turn is the user's message and the reply to it: they go in or out of the context together. */
function setExcluded(index, excluded) {
  conv.messages[index].excluded = excluded;
  if (conv.messages[index - 1]?.role === "user") conv.messages[index - 1].excluded = excluded;
  save();
  renderLog();
}

// --- sending ---------------------------------------------------------------------------

function send(text) {
  if (reply || !text.trim()) return;
  if (editing !== null) {
    conv.messages.splice(editing);
    editing = null;
  }
  if (conv.messages.length === 0 || conv.title === "New chat") conv.title = titleFrom(text);
  conv.messages.push({ role: "user", content: text });
  input.value = "";
  startReply();
}

function regenerate() {
  if (reply) return;
  if (conv.messages.at(-1)?.role === "assistant") conv.messages.pop();
  const user = conv.messages.at(-1);
  if (user?.role === "user") user.excluded = false;
  startReply();
}

function edit(index) {
  if (reply) return;
  editing = index;
  input.value = conv.messages[index].content;
  input.focus();
  setStatus("editing your last message: Send replaces it and what followed");
}

async function startReply() {
  const msg = { role: "assistant", content: "", reasoning: "" };
  conv.messages.push(msg);
  save();
  renderLog();
  const el = log.lastElementChild;
  const id = `r${nextId++}`;
  reply = { id, msg, el, text: el.querySelector(".text"), thoughts: el.querySelector(".reasoning-text"), startedAt: performance.now(), firstAt: 0, lastAt: 0, stopping: false, usage: null, finish: null };
  const body = requestBody();
  const state = models.find((m) => m.id === body.model)?.state;
  if (state && state !== "ready") reply.text.textContent = `loading ${body.model}…`;
  sendButton.disabled = true;
  stopButton.disabled = false;
  try {
    await connection.open();
    connection.send({ type: "chat.completions.create", id, body });
  } catch (err) {
    finish({ problem: `${err.message}.` });
  }
}

/**
 * Tokens may arrive thousands a second: the reply is re-rendered at most once a frame,
 * and only the reply (never the whole history).
 */
let paintQueued = false;
function schedulePaint() {
  if (paintQueued) return;
  paintQueued = true;
  requestAnimationFrame(() => {
    paintQueued = false;
    if (!reply) return;
    renderMarkdown(reply.text, reply.msg.content, false);
    if (reply.msg.reasoning) {
      reply.thoughts.textContent = reply.msg.reasoning;
      reply.thoughts.parentElement.hidden = false;
    }
    log.scrollTop = log.scrollHeight;
  });
}

function onFrame(frame) {
  if (!reply || frame.id !== reply.id) return;
  if (frame.type === "chunk") {
    const chunk = frame.chunk;
    if (chunk.usage) reply.usage = chunk.usage;
    const choice = chunk.choices[0];
    if (!choice || reply.stopping) return;
    const delta = choice.delta ?? {};
    if (delta.content || delta.reasoning_content) {
      const now = performance.now();
      if (!reply.firstAt) reply.firstAt = now;
      reply.lastAt = now;
      if (delta.content) reply.msg.content += delta.content;
      if (delta.reasoning_content) reply.msg.reasoning += delta.reasoning_content;
      schedulePaint();
    }
    if (choice.finish_reason) reply.finish = choice.finish_reason;
  } else if (frame.type === "done") {
    finish(reply.stopping ? { stopped: true } : {});
  } else if (frame.type === "error") {
    finish(frame.error.type === "cancelled" || reply.stopping ? { stopped: true } : { problem: plainError(frame.error, frame.retry_after) });
  }
}

function stop() {
  if (!reply || reply.stopping) return;
  // Nothing more is shown from the moment Stop is pressed; the server frees the slot
  // within one decode step and answers with a cancelled error.
  reply.stopping = true;
  connection.send({ type: "cancel", id: reply.id });
  stopButton.disabled = true;
  setStatus("stopping…");
}

function finish({ stopped = false, problem = null }) {
  const r = reply;
  reply = null;
  const m = r.msg;
  const u = r.usage;
  m.stats = {
    finish: r.finish ?? undefined,
    completionTokens: u?.completion_tokens,
    promptTokens: u?.prompt_tokens,
    ttftMs: r.firstAt ? r.firstAt - r.startedAt : undefined,
    // From the first token to the last: the model's speed, without the queue and prefill.
    tokensPerSecond: u && u.completion_tokens > 1 && r.lastAt > r.firstAt ? ((u.completion_tokens - 1) * 1000) / (r.lastAt - r.firstAt) : undefined,
  };
  if (stopped || problem) {
    m.status = stopped ? "stopped" : "error";
    if (problem) m.error = problem;
    // Not resent with the next turn unless the user includes it again.
    m.excluded = true;
    const prev = conv.messages[conv.messages.indexOf(m) - 1];
    if (prev?.role === "user") prev.excluded = true;
  }
  if (!m.reasoning) delete m.reasoning;
  save();
  renderLog();
  sendButton.disabled = false;
  stopButton.disabled = true;
  setStatus(stopped ? "stopped" : problem ? "the last reply failed" : "connected");
  input.focus();
}

/** The server's error in plain words, with what to do about it. */
function plainError(error, retryAfter) {
  const again = retryAfter ? ` Try again in ${retryAfter} s.` : "";
  switch (error.code) {
    case "queue_full":
      return `The server is busy: its queue is full.${again}`;
    case "deadline_unmeetable":
      return `The server is too busy to start this before its deadline.${again}`;
    case "context_length_exceeded":
      return `This conversation is too long for the model's context: start a new chat, leave earlier turns out, or lower Max tokens. (${error.message})`;
    case "model_loading":
      return `The model is still loading.${again || " Try again in a moment."}`;
    case "model_not_loaded":
      return "This model is not loaded, and this server loads models only when an operator asks.";
    case "insufficient_memory":
      return `There is no room in the server's memory for this model now.${again}`;
  }
  if (error.type === "timeout") return "The reply took longer than the server's deadline.";
  if (error.type === "rate_limited" || error.type === "rate_limit_error") return `This API key's limit is reached.${again}`;
  return error.message;
}

// --- models and access -----------------------------------------------------------------

async function loadModels() {
  try {
    models = await fetchModels();
  } catch (err) {
    if (err instanceof KeyRequired) return askForKey();
    setStatus(`error: ${err.message}`);
    return;
  }
  modelSelect.replaceChildren(
    ...models.map((m) => {
      const o = document.createElement("option");
      o.value = m.id;
      // Ids and aliases with what they serve and its state; a model not in memory loads on its first request.
      o.textContent = `${m.id}${m.kind === "alias" && m.resolves_to ? ` → ${m.resolves_to}` : ""}${m.state ? ` · ${m.state}` : ""}`;
      o.disabled = m.state === "failed";
      return o;
    }),
  );
  fillSettings();
  connection.open().catch((err) => setStatus(`error: ${err.message}`));
}

function askForKey(problem = "") {
  const dialog = $("key-dialog");
  $("key-error").textContent = problem;
  $("key-input").value = "";
  if (!dialog.open) dialog.showModal();
}

$("key-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  setApiKey($("key-input").value.trim());
  try {
    models = await fetchModels();
  } catch (err) {
    $("key-error").textContent = err instanceof KeyRequired ? "The server refused this key." : err.message;
    return;
  }
  $("key-dialog").close();
  connection.close();
  loadModels();
});

// --- theme, layout, keys ---------------------------------------------------------------

const prefersDark = matchMedia("(prefers-color-scheme: dark)");
const effectiveDark = () => (document.documentElement.dataset.theme ?? (prefersDark.matches ? "dark" : "light")) === "dark";
function showTheme() {
  $("theme").setAttribute("aria-pressed", String(effectiveDark()));
}
$("theme").addEventListener("click", () => {
  const next = effectiveDark() ? "light" : "dark";
  document.documentElement.dataset.theme = next;
  localStorage.setItem("spindle.theme", next);
  showTheme();
});
prefersDark.addEventListener("change", showTheme);

function closeSidebarOnPhone() {
  document.body.classList.remove("sidebar-open");
  $("toggle-sidebar").setAttribute("aria-expanded", "false");
}
$("toggle-sidebar").addEventListener("click", () => {
  const openNow = document.body.classList.toggle("sidebar-open");
  $("toggle-sidebar").setAttribute("aria-expanded", String(openNow));
});
function showSettings(open) {
  $("settings").hidden = !open;
  $("settings-toggle").setAttribute("aria-expanded", String(open));
  localStorage.setItem("spindle.settingsOpen", open ? "1" : "");
}
$("settings-toggle").addEventListener("click", () => showSettings($("settings").hidden));

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  send(input.value);
});
input.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    send(input.value);
  }
});
document.addEventListener("keydown", (e) => {
  if (e.key === "Escape" && reply) {
    e.preventDefault();
    stop();
  }
});
stopButton.addEventListener("click", stop);
modelSelect.addEventListener("change", () => {
  conv.settings.model = modelSelect.value;
  save();
});
$("new-chat").addEventListener("click", startNew);
$("search").addEventListener("input", renderSidebar);
$("export").addEventListener("click", () => {
  const url = URL.createObjectURL(new Blob([exportJson(conversations)], { type: "application/json" }));
  const a = document.createElement("a");
  a.href = url;
  a.download = `spindle-conversations-${new Date().toISOString().slice(0, 10)}.json`;
  a.click();
  URL.revokeObjectURL(url);
});
$("import-button").addEventListener("click", () => $("import").click());
$("import").addEventListener("change", async () => {
  const file = $("import").files[0];
  if (!file) return;
  try {
    const added = parseImport(await file.text(), conversations);
    conversations.push(...added);
    saveAll(conversations);
    renderSidebar();
    setStatus(`imported ${added.length} conversation${added.length === 1 ? "" : "s"}`);
  } catch (err) {
    setStatus(`import failed: ${err.message}`);
  }
  $("import").value = "";
});

// --- start -----------------------------------------------------------------------------

showTheme();
showSettings(localStorage.getItem("spindle.settingsOpen") === "1");
const start = conversations.find((c) => c.id === currentId()) ?? conversations[0];
if (start) open(start);
else startNew();
loadModels();
