/**
 * Stored Responses (`store: true`, OpenAI's default): kept in memory, bounded by count,
 * bytes and age (the oldest go first; a chain of continuations stores its conversation
 * once per response, so the byte bound is the one that holds against long chains), so `previous_response_id` can continue a conversation and
 * `GET /v1/responses/{id}` read one back. A response belongs to the API key that made
 * it: another key is told it does not exist. Nothing is written to disk.
 */
import type { TemplateMessage } from "../engine/chat-template.js";

export interface StoredResponse {
  id: string;
  /** The API key's index that made it; -1 when keys are off. */
  owner: number;
  /** The response object as it was answered. */
  response: Record<string, unknown>;
  /** This request's input items, as the client sent them (GET …/input_items). */
  inputItems: unknown[];
  /** The whole conversation through this response's output: what a continuation starts from. */
  conversation: TemplateMessage[];
  storedAt: number;
  /** Its size, estimated once when stored. */
  bytes: number;
}

/** About what a response takes in memory: its JSON twice over (answer, input and conversation overlap) at two bytes a character. */
function estimateBytes(r: Omit<StoredResponse, "storedAt" | "bytes">): number {
  return 2 * (JSON.stringify(r.response).length + JSON.stringify(r.inputItems).length + JSON.stringify(r.conversation).length) + 512;
}

export class ResponseStore {
  private readonly items = new Map<string, StoredResponse>();
  private bytes = 0;

  constructor(
    private readonly maxItems: number,
    private readonly ttlMs: number,
    private readonly maxBytes: number = Number.POSITIVE_INFINITY,
  ) {}

  private remove(id: string): void {
    const r = this.items.get(id);
    if (!r) return;
    this.items.delete(id);
    this.bytes -= r.bytes;
  }

  get enabled(): boolean {
    return this.maxItems > 0;
  }

  private expire(now: number): void {
    for (const [id, r] of this.items) {
      if (now - r.storedAt <= this.ttlMs) break;
      this.remove(id);
    }
  }

  /** Stores it; false when it alone is larger than the store may hold (it is then not stored). */
  put(r: Omit<StoredResponse, "storedAt" | "bytes">): boolean {
    if (!this.enabled) return false;
    const bytes = estimateBytes(r);
    if (bytes > this.maxBytes) return false;
    const now = performance.now();
    this.expire(now);
    this.remove(r.id);
    this.items.set(r.id, { ...r, storedAt: now, bytes });
    this.bytes += bytes;
    while (this.items.size > this.maxItems || this.bytes > this.maxBytes) this.remove(this.items.keys().next().value!);
    return true;
  }

  /** The stored response, if it exists, has not expired, and belongs to this owner. */
  get(id: string, owner: number): StoredResponse | undefined {
    this.expire(performance.now());
    const r = this.items.get(id);
    return r && r.owner === owner ? r : undefined;
  }

  delete(id: string, owner: number): boolean {
    const r = this.get(id, owner);
    if (!r) return false;
    this.remove(id);
    return true;
  }

  get size(): number {
    return this.items.size;
  }

  /** Estimated bytes held. */
  get heldBytes(): number {
    return this.bytes;
  }
}
