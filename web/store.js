// Conversations, kept in this browser (localStorage): each with its messages and its
// own settings. Saved when something is said or changed, never per token.

const KEY = "spindle.conversations.v1";
const CURRENT = "spindle.current";

/**
 * A message: { role: "user"|"assistant", content, reasoning?, status?: "error"|"stopped",
 * error?, excluded?: boolean (not sent with the next turn), stats? }.
 * A conversation: { id, title, createdAt, updatedAt, settings: {model?, system?, temperature?,
 * top_p?, top_k?, max_tokens?, seed?, stop?: string[]}, messages: [] }.
 */
export function newConversation(settings = {}) {
  const now = Date.now();
  return { id: `c${now.toString(36)}${Math.random().toString(36).slice(2, 7)}`, title: "New chat", createdAt: now, updatedAt: now, settings: { ...settings }, messages: [] };
}

export function loadAll() {
  try {
    const list = JSON.parse(localStorage.getItem(KEY) ?? "[]");
    return Array.isArray(list) ? list.filter(valid) : [];
  } catch {
    return [];
  }
}

export function saveAll(list) {
  try {
    localStorage.setItem(KEY, JSON.stringify(list));
    return true;
  } catch {
    // Quota: the caller says so; nothing else breaks.
    return false;
  }
}

export const currentId = () => localStorage.getItem(CURRENT);
export const setCurrentId = (id) => localStorage.setItem(CURRENT, id);

function valid(c) {
  return c && typeof c.id === "string" && Array.isArray(c.messages) && c.messages.every((m) => m && (m.role === "user" || m.role === "assistant") && typeof m.content === "string");
}

/** Conversations from an export file, with fresh ids where they collide with existing ones. */
export function parseImport(text, existing) {
  const data = JSON.parse(text);
  const list = Array.isArray(data) ? data : Array.isArray(data?.conversations) ? data.conversations : null;
  if (!list) throw new Error("not a Spindle conversations export");
  const taken = new Set(existing.map((c) => c.id));
  const out = [];
  for (const c of list) {
    if (!valid(c)) throw new Error("a conversation in the file is not in the expected shape");
    const copy = { ...newConversation(c.settings ?? {}), ...c, settings: { ...(c.settings ?? {}) } };
    if (taken.has(copy.id)) copy.id = newConversation().id;
    taken.add(copy.id);
    out.push(copy);
  }
  return out;
}

export function exportJson(list) {
  return JSON.stringify({ format: "spindle-conversations", version: 1, exportedAt: new Date().toISOString(), conversations: list }, null, 2);
}

/** A title from the first user message: its first line, shortened. */
export function titleFrom(text) {
  const line = text.trim().split("\n")[0] ?? "";
  return line.length > 48 ? `${line.slice(0, 47)}…` : line || "New chat";
}
