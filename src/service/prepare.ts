/**
 * Turns a raw OpenAI request body into an engine-ready generation, for any transport
 * (HTTP JSON, SSE, WebSocket): validation, routing to a model version and a lease on
 * it (which may wait for a load), prompt rendering and tokenization, context fit,
 * sampling, deadline and priority. A mirrored (shadow) copy, when the route asks for
 * one, is started here and reports only to metrics.
 */
import { randomBytes } from "node:crypto";
import { ApiError } from "../errors.js";
import { PromptRenderError, type Token } from "../engine/llama-engine.js";
import type { Lease, ModelRegistry, ReadyEntry } from "../models/registry.js";
import type { Route } from "../models/repository.js";
import { chatRequestSchema, requestedMaxTokens, toChatMessages, type ChatRequest } from "../protocol/chat.js";
import { parseBody, stopList } from "../protocol/common.js";
import { completionPrompt, completionRequestSchema, type CompletionRequest } from "../protocol/completions.js";
import type { GenerationRequest, GenerationSink } from "../scheduler/types.js";
import type { Telemetry } from "../telemetry/request-telemetry.js";
import { buildGenerationRequest, requestTiming, resolveMaxTokens, samplingParams, type RequestContext, type RequestTiming } from "./build-request.js";

export type Endpoint = "chat" | "text";

export interface ResponseMeta {
  id: string;
  created: number;
  /** "id@version": which immutable version served the request (OpenAI's field for the resolved model). */
  model: string;
  endpoint: Endpoint;
}

export interface PreparedGeneration {
  entry: ReadyEntry;
  /** Held until the generation ends: the version cannot be evicted under it. The caller releases it. */
  lease: Lease;
  via: Route["via"];
  /** performance.now() before and after the lease: the time spent waiting for a load (or an eviction). */
  acquire: { start: number; end: number };
  meta: ResponseMeta;
  stream: boolean;
  includeUsage: boolean;
  /** Text sent before the generated text (completions' `echo`). */
  echo: string;
  gen: GenerationRequest;
}

/** OpenAI's legacy completions default to 16 tokens. */
const TEXT_DEFAULT_MAX_TOKENS = 16;

function meta(endpoint: Endpoint, entry: ReadyEntry): ResponseMeta {
  return {
    id: `${endpoint === "chat" ? "chatcmpl" : "cmpl"}-${randomBytes(12).toString("hex")}`,
    created: Math.floor(Date.now() / 1000),
    model: entry.key,
    endpoint,
  };
}

interface Built {
  gen: GenerationRequest;
  echo: string;
}

function buildChat(entry: ReadyEntry, body: ChatRequest, timing: RequestTiming, signal: AbortSignal): Built {
  const model = entry.engine;
  let rendered;
  try {
    rendered = model.renderChat(toChatMessages(body));
  } catch (err) {
    if (err instanceof PromptRenderError) throw new ApiError("invalid_request", err.message, { param: "messages", code: "invalid_messages" });
    throw err;
  }
  const maxParam = body.max_completion_tokens != null ? "max_completion_tokens" : "max_tokens";
  const maxTokens = resolveMaxTokens(rendered.tokens.length, requestedMaxTokens(body), entry.sampling.max_tokens, model.ctxSize, {
    prompt: "messages",
    maxTokens: maxParam,
  });
  const gen = buildGenerationRequest({
    promptTokens: rendered.tokens,
    maxTokens,
    stop: [...stopList(body.stop), ...rendered.stopStrings],
    sampling: samplingParams(body, entry, model),
    timing,
    signal,
  });
  return { gen, echo: "" };
}

function buildCompletion(entry: ReadyEntry, body: CompletionRequest, timing: RequestTiming, signal: AbortSignal): Built {
  const model = entry.engine;
  const prompt = completionPrompt(body);
  let tokens: Token[];
  if ("text" in prompt) {
    tokens = model.tokenizePrompt(prompt.text);
  } else {
    const bad = prompt.tokens.find((t) => !model.isValidToken(t));
    if (bad !== undefined) {
      throw new ApiError("invalid_request", `Invalid value for 'prompt': token id ${bad} is outside the vocabulary.`, { param: "prompt", code: "invalid_value" });
    }
    tokens = prompt.tokens as Token[];
  }
  if (tokens.length === 0) throw new ApiError("invalid_request", "The prompt is empty.", { param: "prompt", code: "invalid_value" });
  const maxTokens = resolveMaxTokens(tokens.length, body.max_tokens ?? undefined, entry.sampling.max_tokens ?? TEXT_DEFAULT_MAX_TOKENS, model.ctxSize, {
    prompt: "prompt",
    maxTokens: "max_tokens",
  });
  const echo = body.echo === true ? ("text" in prompt ? prompt.text : model.detokenize(tokens)) : "";
  const gen = buildGenerationRequest({ promptTokens: tokens, maxTokens, stop: stopList(body.stop), sampling: samplingParams(body, entry, model), timing, signal });
  return { gen, echo };
}

const DISCARD: GenerationSink = { onStart() {}, onText() {}, onDone() {}, onError() {} };

/**
 * Runs the same request on the shadow version, at low priority, its output discarded.
 * It is not tied to the client (a client that leaves does not change what the shadow
 * measures) and is never counted in the client's usage or rate limits.
 */
function runShadow<B>(shadow: Lease, body: B, timing: RequestTiming, build: (e: ReadyEntry, b: B, t: RequestTiming, s: AbortSignal) => Built, telemetry: Telemetry | undefined): void {
  const { entry } = shadow;
  const report = (outcome: string) => telemetry?.metrics.shadowRequest(entry.id, entry.version, outcome);
  let gen: GenerationRequest;
  try {
    gen = build(entry, body, { ...timing, priority: "low" }, new AbortController().signal).gen;
  } catch {
    shadow.release();
    report("invalid");
    return;
  }
  entry.scheduler.submit(gen, DISCARD).then(
    (outcome) => {
      shadow.release();
      report("error" in outcome ? `error_${outcome.error.kind}` : "completed");
    },
    () => {
      shadow.release();
      report("error_internal");
    },
  );
}

async function prepare<B extends { model: string; user?: string | null; stream?: boolean | null; stream_options?: { include_usage?: boolean | null } | null }>(
  endpoint: Endpoint,
  body: B,
  registry: ModelRegistry,
  ctx: RequestContext,
  build: (e: ReadyEntry, b: B, t: RequestTiming, s: AbortSignal) => Built,
  telemetry: Telemetry | undefined,
): Promise<PreparedGeneration> {
  // Headers are checked before anything waits for a model.
  const timing = requestTiming(ctx);
  const start = performance.now();
  const { lease, via, shadow } = await registry.acquire(body.model, body.user ?? undefined, timing.deadline, ctx.signal);
  const acquire = { start, end: performance.now() };
  let built: Built;
  try {
    built = build(lease.entry, body, timing, ctx.signal);
  } catch (err) {
    lease.release();
    shadow?.release();
    throw err;
  }
  if (shadow) runShadow(shadow, body, timing, build, telemetry);
  return {
    entry: lease.entry,
    lease,
    via,
    acquire,
    meta: meta(endpoint, lease.entry),
    stream: body.stream === true,
    includeUsage: body.stream_options?.include_usage === true,
    echo: built.echo,
    gen: built.gen,
  };
}

export type Prepare = (registry: ModelRegistry, rawBody: unknown, ctx: RequestContext, telemetry?: Telemetry) => Promise<PreparedGeneration>;

export const prepareChat: Prepare = async (registry, rawBody, ctx, telemetry) => {
  const body = parseBody(chatRequestSchema, rawBody);
  return prepare("chat", body, registry, ctx, buildChat, telemetry);
};

export const prepareCompletion: Prepare = async (registry, rawBody, ctx, telemetry) => {
  const body = parseBody(completionRequestSchema, rawBody);
  return prepare("text", body, registry, ctx, buildCompletion, telemetry);
};
