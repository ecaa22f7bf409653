import type { ApiError } from "../errors.js";
import type { SamplingParams, Token } from "../engine/llama-engine.js";

export type Priority = "high" | "normal" | "low";
export type FinishReason = "stop" | "length";

/** One validated generation, engine-ready: the only thing the scheduler accepts. */
export interface GenerationRequest {
  promptTokens: Token[];
  maxTokens: number;
  /** User stop strings plus the chat template's own; none is ever sent to the client. */
  stop: string[];
  sampling: SamplingParams;
  priority: Priority;
  /** performance.now() by which the request must be finished. */
  deadline: number;
  signal: AbortSignal;
  /** Filled in by the scheduler as the request moves on; read by telemetry at the end. */
  timeline: Timeline;
}

/** performance.now() timestamps of a request's life in the scheduler. */
export interface Timeline {
  queuedAt?: number;
  startedAt?: number;
  firstTokenAt?: number;
  endedAt?: number;
  slot?: number;
  cachedTokens?: number;
}

/** Per-model figures the scheduler reports as they happen (metrics); all optional work. */
export interface SchedulerObserver {
  /** Seconds between two tokens of one sequence. */
  interTokenLatency(seconds: number): void;
  decodeStep(sequences: number, tokens: number): void;
}

export interface Usage {
  promptTokens: number;
  completionTokens: number;
  cachedTokens: number;
}

export interface GenerationResult {
  finishReason: FinishReason;
  usage: Usage;
}

/** How a generation ended: what submit()'s promise resolves with. */
export type GenerationOutcome = { result: GenerationResult } | { error: ApiError; usage: Usage | undefined };

/**
 * Where a generation's events go. One event model, several encodings (SSE, JSON, and
 * later WebSocket). Calls are synchronous on purpose: the token loop must not wait on
 * the network, or it would miss decode steps.
 */
export interface GenerationSink {
  /** The request got a slot; nothing was sent before this. */
  onStart(): void;
  onText(text: string): void;
  onDone(result: GenerationResult): void;
  /** Called at most once, instead of onDone; before or after onStart. */
  onError(error: ApiError, usage: Usage | undefined): void;
}
