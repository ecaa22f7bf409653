// The server: its model list over HTTP, generations over one WebSocket (/v1/ws). With API
// keys on, the key (kept in session storage) goes in the Authorization header and as the
// socket's first frame; a refused key is reported once, as `onKeyRefused`.

const KEY = "spindle.apiKey";

export const apiKey = () => sessionStorage.getItem(KEY) ?? "";
export const setApiKey = (k) => (k ? sessionStorage.setItem(KEY, k) : sessionStorage.removeItem(KEY));

export class KeyRequired extends Error {}

/** GET /v1/models: ids and aliases with their state. Throws KeyRequired on 401. */
export async function fetchModels() {
  const key = apiKey();
  const res = await fetch("/v1/models", { headers: key ? { authorization: `Bearer ${key}` } : {} });
  if (res.status === 401) throw new KeyRequired((await res.json().catch(() => null))?.error?.message ?? "an API key is required");
  if (!res.ok) throw new Error(`the model list failed (${res.status})`);
  const { data } = await res.json();
  return data;
}

export class Connection {
  /** @param {{ onFrame(frame): void, onStatus(text): void, onClosed(reason): void, onKeyRefused(message): void }} handlers */
  constructor(handlers) {
    this.handlers = handlers;
    this.socket = null;
    this.opening = null;
  }

  open() {
    if (this.socket?.readyState === WebSocket.OPEN) return Promise.resolve(this.socket);
    if (this.opening) return this.opening;
    this.opening = new Promise((resolve, reject) => {
      const ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/v1/ws`);
      let refused = null;
      ws.onopen = () => {
        const key = apiKey();
        if (key) ws.send(JSON.stringify({ type: "auth", token: key }));
        this.socket = ws;
        this.opening = null;
        this.handlers.onStatus("connected");
        resolve(ws);
      };
      ws.onerror = () => {
        this.opening = null;
        reject(new Error("cannot reach the server"));
      };
      ws.onclose = (e) => {
        this.socket = null;
        this.opening = null;
        if (refused) this.handlers.onKeyRefused(refused);
        this.handlers.onClosed(refused ? "the API key was refused" : e.reason || "disconnected");
      };
      ws.onmessage = (e) => {
        const frame = JSON.parse(e.data);
        // An error for no request is about the connection: a missing or refused key.
        if (frame.type === "error" && frame.id === null && frame.error?.type === "authentication_error") refused = frame.error.message;
        else this.handlers.onFrame(frame);
      };
    });
    return this.opening;
  }

  send(frame) {
    this.socket?.send(JSON.stringify(frame));
  }

  close() {
    this.socket?.close();
  }
}
