/**
 * What the serving path reports, and to whom: the contracts between the path (service,
 * models, scheduler) and what watches it (telemetry). They live at the bottom of the
 * house so the path never imports telemetry and telemetry never reaches into the path:
 * the path calls these interfaces with plain records, and the watchers read read-only
 * snapshots. The composition root (src/server.ts) plugs one into the other.
 */
import type { ErrorKind } from "./errors.js";

/** The API a request came through: a label for metrics, logs and traces. */
export type Endpoint = "chat" | "completions" | "responses" | "messages" | "embeddings";
export type Transport = "http" | "sse" | "ws";

/** performance.now() timestamps of a generation's life in the scheduler. */
export interface Timeline {
  queuedAt?: number;
  startedAt?: number;
  /** The slot's KV was cut back to the prompt's shared prefix (a wait for the engine's lock: the step in flight). */
  trimmedAt?: number;
  firstTokenAt?: number;
  endedAt?: number;
  slot?: number;
  cachedTokens?: number;
}

export interface Usage {
  promptTokens: number;
  completionTokens: number;
  cachedTokens: number;
}

export type Headers = Record<string, string | string[] | undefined>;

export interface RequestStart {
  id: string;
  endpoint: Endpoint;
  transport: Transport;
  /** For the incoming W3C traceparent. */
  headers: Headers;
}

/** Everything known about one finished request: reported once, when it ends. */
export interface RequestRecord {
  id: string;
  endpoint: Endpoint;
  /** "sse" when an HTTP request was answered as a stream. */
  transport: Transport;
  /** The version that served it, once the name was resolved. */
  model: { id: string; version: string } | undefined;
  /** How the name resolved: id, canary, alias, exact. */
  route: string | undefined;
  /** The API key's configured name, never the key. */
  key: string | undefined;
  /** The error's status when it failed (also mid-stream, where HTTP already said 200), else 200. */
  status: number;
  finishReason: string | undefined;
  error: { kind: ErrorKind; code: string | null; message: string; /** What an internal error was, for operators (never sent to clients). */ cause?: string } | undefined;
  usage: Usage | undefined;
  /** performance.now() at arrival and at the end. */
  start: number;
  end: number;
  /** When the request waited for its model version to load (or for an eviction). */
  modelWait: { start: number; end: number } | undefined;
  timeline: Timeline | undefined;
  sampling: { maxTokens: number; temperature: number; topP: number; seed: number; promptTokens: number } | undefined;
  responseId: string | undefined;
}

export interface RequestObservation {
  /** The trace id to hand back to the client, when tracing is on. */
  readonly traceId: string | undefined;
  finish(record: RequestRecord): void;
}

export interface RequestObserver {
  start(info: RequestStart): RequestObservation;
}

/** Per-model figures the scheduler reports as they happen; called on the per-token path. */
export interface SchedulerObserver {
  /** Seconds between two tokens of one sequence. */
  interTokenLatency(seconds: number): void;
  decodeStep(sequences: number, tokens: number): void;
}

export type EvictionReason = "lru" | "admin";

/** Model lifecycle events, as residency and the registry see them happen. */
export interface ModelEvents {
  /** Bound once per loaded version, for the hot path; undefined: nothing to report. */
  schedulerObserver(model: string, version: string): SchedulerObserver | undefined;
  loaded(model: string, version: string, times: { loadStart: number; loadEnd: number; warmupEnd: number }): void;
  loadFailed(model: string, version: string, times: { start: number; end: number }, reason: string): void;
  evicted(model: string, version: string, reason: EvictionReason): void;
  shadow(model: string, version: string, outcome: string): void;
  repositoryChange(name: string, action: string): void;
}

export const NO_MODEL_EVENTS: ModelEvents = {
  schedulerObserver: () => undefined,
  loaded() {},
  loadFailed() {},
  evicted() {},
  shadow() {},
  repositoryChange() {},
};

/**
 * unloaded: known, not in memory (never loaded, or evicted); loading: artifact, load or
 * warm-up under way; ready: loaded and warmed, serving; unloading: being evicted;
 * failed: cannot be served (bad artifact, load or warm-up error), with the reason.
 */
export type ModelState = "unloaded" | "loading" | "ready" | "unloading" | "failed";

export interface Bytes {
  ram: number;
  vram: number;
}

export interface SchedulerSnapshot {
  busySlots: number;
  totalSlots: number;
  waiting: number;
  waitingTokens: number;
  /** Tokens whose KV the slots hold (idle slots keep theirs for prefix reuse). */
  heldTokens: number;
  /** Tokens whose KV the busy slots hold: what running requests occupy. */
  runningTokens: number;
  /** Decode steps, sequences in them, sequences running at them, tokens in them. */
  steps: number;
  items: number;
  expected: number;
  tokens: number;
}

/** One model version as it is now: a copy, safe to read anywhere. */
export interface VersionSnapshot {
  key: string;
  id: string;
  version: string;
  state: ModelState;
  /** Why it failed or was not loaded; for operators (the log and admin routes). */
  error: string | undefined;
  pinned: boolean;
  sha256: string | undefined;
  license: string | undefined;
  source: string | undefined;
  estimate: Bytes | undefined;
  actual: Bytes | undefined;
  loadSeconds: number | undefined;
  warmupSeconds: number | undefined;
  readySeconds: number | undefined;
  loads: number;
  evictions: number;
  active: number;
  everReady: boolean;
  /** Unix seconds when it last became ready (the OpenAI `created`). */
  created: number;
  /** Present while the version is in memory. */
  loaded:
    | {
        /** Tokens per sequence of the largest slot class. */
        contextLength: number;
        /** Sequences over every class. */
        parallel: number;
        slotClasses: Array<{ count: number; ctxSize: number }>;
        /** KV cells over every class. */
        kvCells: number;
        /** Speculative decoding, when on: predicted tokens the model accepted and rejected since the load. */
        speculative: { method: string; tokens: number; accepted: number; rejected: number } | undefined;
        chatTemplate: string;
        kvCacheTypes: { k: string; v: string };
        kvBytesPerToken: number;
        weightsBytes: number;
        scheduler: SchedulerSnapshot;
      }
    | undefined;
}

export interface ResidencySnapshot {
  budget: Bytes;
  used: Bytes;
  versions: VersionSnapshot[];
}
