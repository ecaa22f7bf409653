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
  /**
   * maxTokens is "the rest of the (largest) context", not asked for: the request fits any
   * slot its prompt fits, and there may generate until that slot's context is full.
   */
  fillsContext?: boolean;
  /** User stop strings plus the chat template's own; none is ever sent to the client. */
  stop: string[];
  sampling: SamplingParams;
  priority: Priority;
  /** performance.now() by which the request must be finished. */
  deadline: number;
  /** Whose request it is: waiting requests share slots between tenants by weight. */
  tenant?: { name: string; weight: number };
  /** A compiled grammar (the engine model's) the output must follow. */
  grammar?: unknown;
  /** End-of-generation (and stop token ids) are not allowed before this many tokens. */
  minTokens?: number;
  /** Token ids that end generation, unsent (vLLM's stop_token_ids). */
  stopTokenIds?: ReadonlySet<number>;
  /** Send the stop string that ended generation (vLLM's include_stop_str_in_output). */
  includeStopString?: boolean;
  /** Per-token log probabilities, with this many alternatives each. */
  logprobs?: number;
  /** Sum the log probability of each chosen token (best_of ranks candidates by it). */
  scoreChoice?: boolean;
  /** Log probabilities of the prompt's own tokens too (echo with logprobs: prompt scoring). */
  promptLogprobs?: boolean;
  /**
   * Aborted when the client goes away or a transport gives up on it; an ApiError as the
   * abort reason says why (e.g. a slow reader), else it ends as "cancelled".
   */
  signal: AbortSignal;
  /** Filled in by the scheduler as the request moves on; read by telemetry at the end. */
  timeline: Timeline;
}

/** One token's log probability and its most likely alternatives, as logprobs show them. */
export interface TokenLogprob {
  token: string;
  logprob: number;
  bytes: number[];
  top: Array<{ token: string; logprob: number; bytes: number[] }>;
}

export interface GenerationResult {
  finishReason: FinishReason;
  usage: Usage;
  /** Σ log p of the chosen tokens, when scoreChoice was asked. */
  logprobSum?: number;
  /** The stop string that ended it, when one did. */
  stopString?: string;
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
  /** Text, with the log probabilities of the tokens it completes when they were asked for. */
  onText(text: string, logprobs?: TokenLogprob[]): void;
  /** The prompt's tokens scored (promptLogprobs): the first has none (null). */
  onPromptLogprobs?(entries: Array<TokenLogprob | null>): void;
}
