/**
 * The generation service's vocabulary: what a protocol hands it (a plan), what the plan
 * may ask of the model that serves it (a PromptModel), and the events it gets back.
 * Protocols (src/protocol) build on these; transports (src/http, src/ws) carry the
 * protocols' output; none of them touches a lease, a queue or a metric.
 */
import type { SamplingDefaults } from "../config/models-file.js";
import type { TemplateCapabilities } from "../engine/chat-template.js";
import type { ChatRenderInput, RenderedChat } from "../engine/prompt-renderer.js";
import type { SamplingParams, Token } from "../engine/types.js";
import type { ApiError } from "../errors.js";
import type { Endpoint, Headers, Transport, Usage } from "../observers.js";
import type { Principal } from "../access/keys.js";
import type { TokenLogprob } from "../scheduler/types.js";
import type { OutputSpec, ToolCallDelta } from "./chat-output.js";

export type { Usage, Principal, TokenLogprob, ToolCallDelta, OutputSpec };

/** Why a choice ended: the scheduler's stop and length, and tool_calls when it called tools. */
export type FinishReason = "stop" | "length" | "tool_calls";

/** What a request's prompt may use of the model version that serves it. */
export interface PromptModel {
  /** "id@version" */
  readonly key: string;
  /** Tokens per sequence. */
  readonly ctxSize: number;
  readonly vocabularySize: number;
  /** The most characters one token stands for: n characters are at least n / this tokens. */
  readonly maxTokenChars: number;
  /** The version's sampling defaults from the models file. */
  readonly sampling: SamplingDefaults;
  /** Text as a completion prompt: BOS when the model wants one, special tokens parsed. */
  tokenize(text: string): Token[];
  /** Renders a chat with the model's own template (exactly, as llama-server does). */
  renderChat(input: ChatRenderInput): RenderedChat;
  readonly template: TemplateCapabilities;
  detokenize(tokens: readonly Token[]): string;
  isValidToken(token: number): boolean;
}

/** What a plan makes of its request for one model: everything but when and how urgently. */
export interface PreparedPrompt {
  promptTokens: Token[];
  maxTokens: number;
  /** max_tokens was not given and had no default: "the rest of the context", of whichever slot it gets. */
  fillsContext?: boolean;
  stop: string[];
  sampling: SamplingParams;
  /** GBNF the output must follow (structured outputs, forced tool calls). */
  grammar?: string;
  minTokens?: number;
  stopTokenIds?: ReadonlySet<number>;
  includeStopString?: boolean;
  /** Per-token log probabilities with this many alternatives each; undefined: none. */
  logprobs?: number;
  /** The prompt's own token log probabilities too (echo with logprobs). */
  promptLogprobs?: boolean;
  /** Choices returned (n), and candidates generated to pick them from (best_of ≥ n). */
  choices?: number;
  candidates?: number;
  /** How the raw text splits into reasoning, content and tool calls. */
  output?: OutputSpec;
}

/** A protocol's validated request, ready to be served by whichever version the name resolves to. */
export interface GenerationPlan {
  /** The requested name: an id, an alias or id@version. */
  readonly model: string;
  /** Sticky canary routing, per end user. */
  readonly user: string | undefined;
  /** Answered as a stream (decides the transport label "sse" for HTTP). */
  readonly stream: boolean;
  /** Renders and tokenizes the prompt for this model; throws an ApiError for input it cannot take. */
  prepare(model: PromptModel): PreparedPrompt;
}

export interface StartInfo {
  /** "id@version" of the version serving the request. */
  model: string;
  /** Unix seconds. */
  created: number;
  /** Headers the answer should carry (x-ratelimit-*). */
  headers: Record<string, string>;
  /** Identifies the configuration that served it (OpenAI's system_fingerprint). */
  fingerprint: string;
  /** How many choices the answer has. */
  choices: number;
  /** Tokens of the prompt as the model reads it (template included). */
  promptTokens: number;
}

export interface ChoiceResult {
  index: number;
  finishReason: FinishReason;
  /** The stop string that ended the choice, when one did. */
  stopString?: string;
}

export interface GenerationResult {
  choices: ChoiceResult[];
  /** Prompt tokens once; completion tokens of every choice (and best_of candidate). */
  usage: Usage;
}

/**
 * The one stream of events a generation produces: onStart once it has a slot, then per
 * choice (by index) its text, reasoning and tool calls as they come, and its end; then
 * onDone — or onError, which comes only after onStart (an error before it is the run's
 * outcome, for the transport to answer). Synchronous, so the token loop never waits on
 * a client. Choices of a best_of request arrive only at the end, already picked.
 */
export interface GenerationEvents {
  onStart(info: StartInfo): void;
  onText(text: string, choice: number, logprobs?: TokenLogprob[]): void;
  onReasoning?(text: string, choice: number): void;
  onToolCall?(delta: ToolCallDelta, choice: number): void;
  /** The prompt's token log probabilities (echo with logprobs), before any text. */
  onPromptLogprobs?(entries: Array<TokenLogprob | null>): void;
  onChoiceDone?(choice: ChoiceResult): void;
  onDone(result: GenerationResult): void;
  onError(error: ApiError): void;
}

/** One request as a transport receives it. */
export interface RequestInfo {
  id: string;
  endpoint: Endpoint;
  transport: Exclude<Transport, "sse">;
  /** Timeouts (X-Request-Timeout, x-stainless-timeout), X-Priority, traceparent. */
  headers: Headers;
  /** The authenticated tenant, when keys are required. */
  principal: Principal | undefined;
  /** Aborted when the client goes away (an ApiError reason says why otherwise). */
  signal: AbortSignal;
}

export interface RunOutcome {
  /** Undefined when the generation completed. */
  error: ApiError | undefined;
  /** Whether onStart was called: after it, the events carried any error themselves. */
  started: boolean;
}

/** What an embedding request may use of the model: its tokenizer, context, and vector size. */
export interface EmbeddingModel extends PromptModel {
  readonly embeddingSize: number;
  /** Shorter vectors the model supports (Matryoshka), as its models file declares; empty: none. */
  readonly dimensions: readonly number[];
}

/** A validated embeddings request. */
export interface EmbeddingPlan {
  readonly model: string;
  readonly user: string | undefined;
  /** The inputs as tokens (each fitting the context), and the vector size asked for. */
  prepare(model: EmbeddingModel): { inputs: Token[][]; dimensions: number | undefined };
}

export interface EmbeddingResult {
  /** "id@version" */
  model: string;
  vectors: number[][];
  promptTokens: number;
}
