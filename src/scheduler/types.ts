import type { ApiError } from "../errors.js";
import type { SamplingParams, Token } from "../engine/types.js";
import type { Timeline, Usage } from "../observers.js";

export type { Timeline, Usage };
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
  /** Whose request it is: waiting requests share slots between tenants by weight. */
  tenant?: { name: string; weight: number };
  /**
   * Aborted when the client goes away or a transport gives up on it; an ApiError as the
   * abort reason says why (e.g. a slow reader), else it ends as "cancelled".
   */
  signal: AbortSignal;
  /** Filled in by the scheduler as the request moves on; read by telemetry at the end. */
  timeline: Timeline;
}

export interface GenerationResult {
  finishReason: FinishReason;
  usage: Usage;
}

/** How a generation ended: what submit()'s promise resolves with. */
export type GenerationOutcome = { result: GenerationResult } | { error: ApiError; usage: Usage | undefined };

/**
 * Where a generation's tokens go, as they are made. Calls are synchronous on purpose:
 * the token loop must not wait on the network, or it would miss decode steps.
 */
export interface TokenSink {
  /** The request got a slot; nothing was sent before this. */
  onStart(): void;
  onText(text: string): void;
}
