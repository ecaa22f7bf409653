// The built-in chat page: streams replies over the WebSocket protocol of /v1/ws.
const $ = (id) => document.getElementById(id);
const log = $("log"), input = $("input"), modelSelect = $("model");
const sendButton = $("send"), stopButton = $("stop"), status = $("status");

/** The conversation so far, sent whole with each turn (the server reuses its KV prefix). */
let history = [];
/** The reply being streamed: { id, el, text, tokens, started, firstAt }. */
let current = null;
let socket = null;
let nextId = 1;

function setStatus(text) { status.textContent = text; }

function bubble(role, text) {
  const el = document.createElement("div");
  el.className = `msg ${role}`;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  el.append(body);
  log.append(el);
  log.scrollTop = log.scrollHeight;
  return el;
}

function connect() {
  return new Promise((resolve, reject) => {
    if (socket && socket.readyState === WebSocket.OPEN) return resolve(socket);
    const ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/v1/ws`);
    ws.onopen = () => { socket = ws; setStatus("connected"); resolve(ws); };
    ws.onerror = () => reject(new Error("cannot connect"));
    ws.onclose = (e) => {
      socket = null;
      setStatus(`disconnected${e.reason ? `: ${e.reason}` : ""}`);
      if (current) finish(null, "disconnected");
    };
    ws.onmessage = (e) => onFrame(JSON.parse(e.data));
  });
}

/**
 * Tokens can arrive thousands a second: paint at most once a frame, so the page stays
 * responsive (the Stop button included) however fast the model is.
 */
let renderPending = null;
function scheduleRender(reply) {
  if (renderPending === reply) return;
  renderPending = reply;
  requestAnimationFrame(() => {
    renderPending = null;
    reply.el.querySelector(".text").textContent = reply.text;
    log.scrollTop = log.scrollHeight;
  });
}

function onFrame(frame) {
  if (!current || frame.id !== current.id) return;
  if (frame.type === "chunk") {
    const choice = frame.chunk.choices[0];
    if (frame.chunk.usage) current.tokens = frame.chunk.usage.completion_tokens;
    if (choice?.delta?.content) {
      if (!current.firstAt) current.firstAt = performance.now();
      current.text += choice.delta.content;
      scheduleRender(current);
    }
    if (choice?.finish_reason) current.finishReason = choice.finish_reason;
  } else if (frame.type === "done") {
    finish(current.finishReason ?? "stop");
  } else if (frame.type === "error") {
    finish(null, frame.error.type === "cancelled" ? "stopped" : frame.error.message);
  }
}

function finish(finishReason, problem) {
  const c = current;
  current = null;
  c.el.querySelector(".text").textContent = c.text;
  const seconds = (performance.now() - (c.firstAt ?? c.started)) / 1000;
  const meta = document.createElement("span");
  meta.className = "meta";
  const rate = c.tokens && seconds > 0 ? ` · ${(c.tokens / seconds).toFixed(1)} tokens/s` : "";
  meta.textContent = problem
    ? `${problem}${c.tokens ? ` · ${c.tokens} tokens` : ""}`
    : `finish: ${finishReason} · ${c.tokens ?? "?"} tokens${rate}`;
  meta.dataset.finish = finishReason ?? "";
  c.el.append(meta);
  if (problem && problem !== "stopped") c.el.classList.add("error");
  // Keep what was said, even a stopped reply, so the next turn sees it.
  if (c.text) history.push({ role: "assistant", content: c.text });
  sendButton.disabled = false;
  stopButton.disabled = true;
  input.focus();
}

async function send(text) {
  if (current || !text.trim()) return;
  history.push({ role: "user", content: text });
  bubble("user", text);
  input.value = "";
  sendButton.disabled = true;
  stopButton.disabled = false;
  const id = `m${nextId++}`;
  current = { id, el: bubble("assistant", ""), text: "", tokens: 0, started: performance.now(), firstAt: 0 };
  try {
    const ws = await connect();
    const body = { model: modelSelect.value, messages: history, stream_options: { include_usage: true } };
    // Empty means "whatever the context has left", which never overflows it.
    const max = Number($("max-tokens").value);
    if (max > 0) body.max_tokens = max;
    ws.send(JSON.stringify({ type: "chat.completions.create", id, body }));
  } catch (err) {
    finish(null, err.message);
  }
}

async function loadModels() {
  const res = await fetch("/v1/models");
  const { data } = await res.json();
  // Model ids and aliases; exact versions (id@version) stay out of the way. A model not
  // in memory is still selectable: the server loads it on demand. A failed one is not.
  modelSelect.replaceChildren(...data.filter((m) => m.kind !== "version").map((m) => {
    const o = document.createElement("option");
    o.value = m.id;
    o.textContent = m.state && m.state !== "ready" ? `${m.id} (${m.state})` : m.id;
    o.disabled = m.state === "failed";
    return o;
  }));
}

$("composer").addEventListener("submit", (e) => { e.preventDefault(); send(input.value); });
input.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send(input.value); }
});
stopButton.addEventListener("click", () => {
  if (current && socket) socket.send(JSON.stringify({ type: "cancel", id: current.id }));
});
$("clear").addEventListener("click", () => { if (!current) { history = []; log.replaceChildren(); } });

loadModels().then(() => connect()).catch((err) => setStatus(`error: ${err.message}`));
