/**
 * The rules every API shares for turning request fields into an engine request: sampling
 * defaults and bounds, context fit and max_tokens, deadlines and priorities.
 */
import { randomInt } from "node:crypto";
import { MAX_TIMER_SECONDS } from "../config/options.js";
import type { SamplingParams } from "../engine/types.js";
import { ApiError, invalidRequest } from "../errors.js";
import type { Headers } from "../observers.js";
import type { Priority } from "../scheduler/types.js";
import type { Principal } from "../access/keys.js";
import type { PromptModel } from "./generation.js";

export interface SamplingInput {
  temperature?: number | null;
  top_p?: number | null;
  seed?: number | null;
  presence_penalty?: number | null;
  frequency_penalty?: number | null;
  logit_bias?: Record<string, number> | null;
  ignore_eos?: boolean | null;
  /** -1 or 0: off (vLLM's and llama-server's conventions). */
  top_k?: number | null;
  min_p?: number | null;
  /** vLLM's name… */
  repetition_penalty?: number | null;
  /** …and llama-server's, with its window. */
  repeat_penalty?: number | null;
  repeat_last_n?: number | null;
}

const OPENAI_DEFAULT_TEMPERATURE = 1;
/** llama-server's default; 0 turns top-k off (slow on large vocabularies: the whole vocabulary is sorted per token). */
const DEFAULT_TOP_K = 40;
/** llama-server's window for its repeat penalty. */
const DEFAULT_REPEAT_LAST_N = 64;

export function samplingParams(input: SamplingInput, model: PromptModel): SamplingParams {
  let logitBias: Map<number, number> | undefined;
  if (input.logit_bias) {
    logitBias = new Map();
    for (const [key, value] of Object.entries(input.logit_bias)) {
      const token = Number(key);
      if (!model.isValidToken(token)) {
        throw invalidRequest(`Invalid value for 'logit_bias': token id ${key} is outside the vocabulary (0..${model.vocabularySize - 1}).`, "logit_bias", "invalid_value");
      }
      logitBias.set(token, value);
    }
  }
  const d = model.sampling;
  if (input.repetition_penalty != null && input.repeat_penalty != null && input.repetition_penalty !== input.repeat_penalty) {
    throw invalidRequest("'repetition_penalty' and 'repeat_penalty' are two names of one setting; send one.", "repeat_penalty", "invalid_value");
  }
  const topK = input.top_k ?? d.top_k ?? DEFAULT_TOP_K;
  return {
    temperature: input.temperature ?? d.temperature ?? OPENAI_DEFAULT_TEMPERATURE,
    topP: input.top_p ?? d.top_p ?? 1,
    topK: topK < 0 ? 0 : topK,
    minP: input.min_p ?? 0,
    repeatPenalty: input.repetition_penalty ?? input.repeat_penalty ?? 1,
    repeatLastN: input.repeat_last_n ?? DEFAULT_REPEAT_LAST_N,
    // llama.cpp takes a 32-bit seed; without one each request draws its own.
    seed: input.seed !== null && input.seed !== undefined ? Number(BigInt.asUintN(32, BigInt(input.seed))) : randomInt(2 ** 32 - 1),
    presencePenalty: input.presence_penalty ?? d.presence_penalty ?? 0,
    frequencyPenalty: input.frequency_penalty ?? d.frequency_penalty ?? 0,
    logitBias,
    ignoreEos: input.ignore_eos === true,
  };
}

/**
 * Checks that prompt and completion fit one sequence's context and settles max_tokens:
 * without one, generation may use all that is left (chat) or the API's default.
 */
export function resolveMaxTokens(
  promptTokens: number,
  requested: number | undefined,
  fallback: number | undefined,
  ctxSize: number,
  params: { prompt: string; maxTokens: string },
): number {
  const param = params.maxTokens;
  if (promptTokens >= ctxSize) {
    throw new ApiError("invalid_request", `This model's maximum context length is ${ctxSize} tokens per request, but the prompt has ${promptTokens} tokens.`, {
      param: params.prompt,
      code: "context_length_exceeded",
    });
  }
  const room = ctxSize - promptTokens;
  if (requested !== undefined) {
    if (requested > room) {
      throw new ApiError(
        "invalid_request",
        `This model's maximum context length is ${ctxSize} tokens per request. The prompt has ${promptTokens} tokens and ${param} is ${requested}: ${promptTokens + requested} in total. Reduce the prompt or ${param}.`,
        { param, code: "context_length_exceeded" },
      );
    }
    return requested;
  }
  return Math.min(room, fallback ?? room);
}

/**
 * Refuses, before any tokenizing or rendering, a prompt whose text alone is surely longer
 * than the context: `chars` characters are at least chars / maxTokenChars tokens. Keeps
 * a body of megabytes from holding the event loop for seconds only to be refused.
 */
export function refuseSurelyTooLong(chars: number, model: PromptModel, param: string): void {
  const atLeast = Math.floor(chars / model.maxTokenChars);
  if (atLeast >= model.ctxSize) {
    throw new ApiError("invalid_request", `This model's maximum context length is ${model.ctxSize} tokens per request, but the ${param} has at least ${atLeast} tokens (${chars} characters).`, {
      param,
      code: "context_length_exceeded",
    });
  }
}

function header(headers: Headers, name: string): string | undefined {
  const v = headers[name];
  return Array.isArray(v) ? v[0] : v;
}

const RANK: Record<Priority, number> = { high: 0, normal: 1, low: 2 };

/**
 * X-Priority, else the tenant's class, else normal. A tenant may ask for a lower class
 * than its own, never a higher one.
 */
export function priorityFrom(headers: Headers, principal?: Principal): Priority {
  const own = principal?.priority ?? "normal";
  const raw = header(headers, "x-priority");
  if (raw === undefined) return own;
  const p = raw.trim().toLowerCase();
  if (p !== "high" && p !== "normal" && p !== "low") throw invalidRequest(`Invalid X-Priority header "${raw}": expected high, normal or low.`, "X-Priority", "invalid_header");
  return principal?.priority !== undefined && RANK[p] < RANK[own] ? own : p;
}

/** X-Request-Timeout, else the OpenAI SDK's x-stainless-timeout, else the server default (seconds); at most a timer's range. */
export function timeoutSecondsFrom(headers: Headers, fallback: number): number {
  const explicit = header(headers, "x-request-timeout");
  if (explicit !== undefined) {
    const n = Number(explicit);
    if (explicit.trim() === "" || !Number.isFinite(n) || n <= 0) {
      throw invalidRequest(`Invalid X-Request-Timeout header "${explicit}": expected a positive number of seconds.`, "X-Request-Timeout", "invalid_header");
    }
    return Math.min(n, MAX_TIMER_SECONDS);
  }
  const sdk = Number(header(headers, "x-stainless-timeout"));
  return Math.min(Number.isFinite(sdk) && sdk > 0 ? sdk : fallback, MAX_TIMER_SECONDS);
}

/** When the request must be done by and how urgent it is: read before anything waits. */
export interface RequestTiming {
  deadline: number;
  priority: Priority;
}

export function requestTiming(headers: Headers, defaultTimeoutSeconds: number, principal: Principal | undefined, arrival: number): RequestTiming {
  const timeout = timeoutSecondsFrom(headers, defaultTimeoutSeconds);
  return { deadline: arrival + timeout * 1000, priority: priorityFrom(headers, principal) };
}
