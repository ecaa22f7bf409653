/**
 * Turns a raw OpenAI request body into an engine-ready generation, for any transport
 * (HTTP JSON, SSE, WebSocket): validation, model resolution, prompt rendering and
 * tokenization, context fit, sampling, deadline and priority.
 */
import { randomBytes } from "node:crypto";
import { ApiError } from "../errors.js";
import { PromptRenderError, type Token } from "../engine/llama-engine.js";
import type { ModelRegistry } from "../models/registry.js";
import { chatRequestSchema, requestedMaxTokens, toChatMessages } from "../protocol/chat.js";
import { parseBody, stopList } from "../protocol/common.js";
import { completionPrompt, completionRequestSchema } from "../protocol/completions.js";
import type { GenerationRequest } from "../scheduler/types.js";
import { buildGenerationRequest, resolveMaxTokens, samplingParams, type RequestContext } from "./build-request.js";

export type Endpoint = "chat" | "text";

export interface ResponseMeta {
  id: string;
  created: number;
  model: string;
  endpoint: Endpoint;
}

export interface PreparedGeneration {
  entry: ReturnType<ModelRegistry["resolve"]>;
  meta: ResponseMeta;
  stream: boolean;
  includeUsage: boolean;
  /** Text sent before the generated text (completions' `echo`). */
  echo: string;
  gen: GenerationRequest;
}

/** OpenAI's legacy completions default to 16 tokens. */
const TEXT_DEFAULT_MAX_TOKENS = 16;

function meta(endpoint: Endpoint, model: string): ResponseMeta {
  return {
    id: `${endpoint === "chat" ? "chatcmpl" : "cmpl"}-${randomBytes(12).toString("hex")}`,
    created: Math.floor(Date.now() / 1000),
    model,
    endpoint,
  };
}

export function prepareChat(registry: ModelRegistry, rawBody: unknown, ctx: RequestContext): PreparedGeneration {
  const body = parseBody(chatRequestSchema, rawBody);
  const entry = registry.resolve(body.model);
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
    ctx,
  });
  return { entry, meta: meta("chat", entry.id), stream: body.stream === true, includeUsage: body.stream_options?.include_usage === true, echo: "", gen };
}

export function prepareCompletion(registry: ModelRegistry, rawBody: unknown, ctx: RequestContext): PreparedGeneration {
  const body = parseBody(completionRequestSchema, rawBody);
  const entry = registry.resolve(body.model);
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
  const gen = buildGenerationRequest({ promptTokens: tokens, maxTokens, stop: stopList(body.stop), sampling: samplingParams(body, entry, model), ctx });
  return { entry, meta: meta("text", entry.id), stream: body.stream === true, includeUsage: body.stream_options?.include_usage === true, echo, gen };
}
