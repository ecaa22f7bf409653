import { randomInt } from "node:crypto";
import { ApiError, invalidRequest } from "../errors.js";
import type { ModelEntry } from "../models/registry.js";
import type { EngineModel, SamplingParams, Token } from "../engine/llama-engine.js";
import type { GenerationRequest, Priority } from "../scheduler/types.js";

export interface SamplingInput {
  temperature?: number | null;
  top_p?: number | null;
  seed?: number | null;
  presence_penalty?: number | null;
  frequency_penalty?: number | null;
  logit_bias?: Record<string, number> | null;
  ignore_eos?: boolean | null;
  top_k?: number | null;
}

export interface RequestContext {
  headers: Record<string, string | string[] | undefined>;
  signal: AbortSignal;
  defaultTimeoutSeconds: number;
}

const OPENAI_DEFAULT_TEMPERATURE = 1;
/** llama-server's default; 0 turns top-k off (slow on large vocabularies: the whole vocabulary is sorted per token). */
const DEFAULT_TOP_K = 40;

export function samplingParams(input: SamplingInput, entry: ModelEntry, model: EngineModel): SamplingParams {
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
  const d = entry.sampling;
  return {
    temperature: input.temperature ?? d.temperature ?? OPENAI_DEFAULT_TEMPERATURE,
    topP: input.top_p ?? d.top_p ?? 1,
    topK: input.top_k ?? d.top_k ?? DEFAULT_TOP_K,
    // llama.cpp takes a 32-bit seed; without one each request draws its own.
    seed: input.seed !== null && input.seed !== undefined ? Number(BigInt.asUintN(32, BigInt(input.seed))) : randomInt(2 ** 32 - 1),
    presencePenalty: input.presence_penalty ?? d.presence_penalty ?? 0,
    frequencyPenalty: input.frequency_penalty ?? d.frequency_penalty ?? 0,
    logitBias,
    ignoreEos: input.ignore_eos === true,
  };
}

function header(headers: RequestContext["headers"], name: string): string | undefined {
  const v = headers[name];
  return Array.isArray(v) ? v[0] : v;
}

export function priorityFrom(headers: RequestContext["headers"]): Priority {
  const raw = header(headers, "x-priority");
  if (raw === undefined) return "normal";
  const p = raw.trim().toLowerCase();
  if (p === "high" || p === "normal" || p === "low") return p;
  throw invalidRequest(`Invalid X-Priority header "${raw}": expected high, normal or low.`, "X-Priority", "invalid_header");
}

/** X-Request-Timeout, else the OpenAI SDK's x-stainless-timeout, else the server default (seconds). */
export function timeoutSecondsFrom(headers: RequestContext["headers"], fallback: number): number {
  const explicit = header(headers, "x-request-timeout");
  if (explicit !== undefined) {
    const n = Number(explicit);
    if (explicit.trim() === "" || !Number.isFinite(n) || n <= 0) {
      throw invalidRequest(`Invalid X-Request-Timeout header "${explicit}": expected a positive number of seconds.`, "X-Request-Timeout", "invalid_header");
    }
    return n;
  }
  const sdk = Number(header(headers, "x-stainless-timeout"));
  return Number.isFinite(sdk) && sdk > 0 ? sdk : fallback;
}

/**
 * Checks that prompt and completion fit one sequence's context and settles max_tokens:
 * without one, generation may use all that is left (chat) or OpenAI's default (text).
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
    throw new ApiError(
      "invalid_request",
      `This model's maximum context length is ${ctxSize} tokens per request, but the prompt has ${promptTokens} tokens.`,
      { param: params.prompt, code: "context_length_exceeded" },
    );
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

/** When the request must be done by and how urgent it is: read from its headers before anything waits. */
export interface RequestTiming {
  deadline: number;
  priority: Priority;
}

export function requestTiming(ctx: RequestContext): RequestTiming {
  const timeout = timeoutSecondsFrom(ctx.headers, ctx.defaultTimeoutSeconds);
  return { deadline: performance.now() + timeout * 1000, priority: priorityFrom(ctx.headers) };
}

export function buildGenerationRequest(args: {
  promptTokens: Token[];
  maxTokens: number;
  stop: string[];
  sampling: SamplingParams;
  timing: RequestTiming;
  signal: AbortSignal;
}): GenerationRequest {
  return {
    promptTokens: args.promptTokens,
    maxTokens: args.maxTokens,
    stop: args.stop,
    sampling: args.sampling,
    priority: args.timing.priority,
    deadline: args.timing.deadline,
    signal: args.signal,
    timeline: {},
  };
}
