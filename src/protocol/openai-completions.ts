/** OpenAI (legacy) Completions: the request schema, how it becomes a generation, and its answers. */
import { randomBytes } from "node:crypto";
import { z } from "zod";
import type { Token } from "../engine/types.js";
import { ApiError, invalidRequest } from "../errors.js";
import type { GenerationPlan, PreparedPrompt, PromptModel } from "../service/generation.js";
import { refuseSurelyTooLong, resolveMaxTokens, samplingParams } from "../service/sampling.js";
import { LIMITS, parseBody, samplingFields, stopList } from "./openai-common.js";
import { ChunkStream, JsonAnswer, type AnswerShape, type StreamTransport } from "./openai-output.js";
import { outputGrammar, structuredOutputFields } from "./structured-output.js";

type Prompt = string | string[] | number[] | number[][];

/**
 * A string, a list of strings, a list of token ids, or a list of such lists. Checked by a
 * loop rather than a zod union: a union over a million token ids took 1.5 s here.
 */
function isPrompt(v: unknown): v is Prompt {
  if (typeof v === "string") return true;
  if (!Array.isArray(v) || v.length === 0) return false;
  const ids = (a: unknown[]) => a.every((x) => typeof x === "number" && Number.isInteger(x) && x >= 0);
  if (typeof v[0] === "string") return v.every((x) => typeof x === "string");
  if (typeof v[0] === "number") return ids(v);
  return v.every((x) => Array.isArray(x) && x.length > 0 && ids(x));
}

export const completionRequestSchema = z.strictObject({
  ...samplingFields,
  ...structuredOutputFields,
  prompt: z.custom<Prompt>(isPrompt, "expected a string, a list of strings, a list of token ids, or a list of lists of token ids"),
  echo: z.boolean().nullable().optional(),
  // The legacy API's logprobs: how many alternatives per token (0–5).
  logprobs: z.number().int().min(0).max(5).nullable().optional(),
  best_of: z.number().int().min(1).max(LIMITS.maxChoices).nullable().optional(),
  stream_options: z.strictObject({ include_usage: z.boolean().nullable().optional(), include_obfuscation: z.boolean().nullable().optional() }).nullable().optional(),
});

export type CompletionRequest = z.infer<typeof completionRequestSchema>;

/** OpenAI's legacy completions default to 16 tokens. */
const TEXT_DEFAULT_MAX_TOKENS = 16;

/** The prompt as text or as token ids; batches of prompts are refused for now. */
export function completionPrompt(req: CompletionRequest): { text: string } | { tokens: number[] } {
  const p = req.prompt;
  if (typeof p === "string") return { text: p };
  if (p.length === 1 && typeof p[0] === "string") return { text: p[0] };
  if (p.length > 0 && p.every((x) => typeof x === "number")) return { tokens: p as number[] };
  throw invalidRequest("A list of prompts is not supported yet: send one prompt (a string, or an array of token ids) per request.", "prompt", "unsupported_value");
}

export class CompletionPlan implements GenerationPlan, AnswerShape {
  readonly kind = "text" as const;
  readonly id = `cmpl-${randomBytes(12).toString("hex")}`;
  private echoText = "";
  private prepared = false;

  constructor(readonly body: CompletionRequest) {}

  get model(): string {
    return this.body.model;
  }

  get user(): string | undefined {
    return this.body.user ?? undefined;
  }

  get stream(): boolean {
    return this.body.stream === true;
  }

  echo(): string {
    return this.echoText;
  }

  prepare(model: PromptModel): PreparedPrompt {
    const body = this.body;
    const prompt = completionPrompt(body);
    let tokens: Token[];
    if ("text" in prompt) {
      refuseSurelyTooLong(prompt.text.length, model, "prompt");
      tokens = model.tokenize(prompt.text);
    } else {
      refuseSurelyTooLong(prompt.tokens.length * model.maxTokenChars, model, "prompt");
      const bad = prompt.tokens.find((t) => !model.isValidToken(t));
      if (bad !== undefined) throw new ApiError("invalid_request", `Invalid value for 'prompt': token id ${bad} is outside the vocabulary.`, { param: "prompt", code: "invalid_value" });
      tokens = prompt.tokens as Token[];
    }
    if (tokens.length === 0) throw new ApiError("invalid_request", "The prompt is empty.", { param: "prompt", code: "invalid_value" });
    // max_tokens 0 scores the prompt without generating (with echo and logprobs).
    const maxTokens =
      body.max_tokens === 0
        ? resolveMaxTokens(tokens.length, 0, 0, model.ctxSize + 1, { prompt: "prompt", maxTokens: "max_tokens" })
        : resolveMaxTokens(tokens.length, body.max_tokens ?? undefined, model.sampling.max_tokens ?? TEXT_DEFAULT_MAX_TOKENS, model.ctxSize, {
            prompt: "prompt",
            maxTokens: "max_tokens",
          });
    // The version that answers prepares first; a shadow's preparation must not change the echo.
    if (!this.prepared) this.echoText = body.echo === true ? ("text" in prompt ? prompt.text : model.detokenize(tokens)) : "";
    this.prepared = true;
    const logprobs = body.logprobs ?? undefined;
    return {
      promptTokens: tokens,
      maxTokens,
      stop: stopList(body.stop),
      sampling: samplingParams(body, model),
      grammar: outputGrammar(body),
      minTokens: body.min_tokens ?? undefined,
      stopTokenIds: body.stop_token_ids ? new Set(body.stop_token_ids) : undefined,
      includeStopString: body.include_stop_str_in_output ?? undefined,
      logprobs,
      // Echo with logprobs scores the prompt itself (how evaluation harnesses read likelihoods).
      promptLogprobs: body.echo === true && logprobs !== undefined,
      choices: body.n ?? 1,
      candidates: body.best_of ?? undefined,
    };
  }

  jsonAnswer(): JsonAnswer {
    return new JsonAnswer(this, this.body.logprobs != null);
  }

  streamAnswer(transport: StreamTransport): ChunkStream {
    return new ChunkStream(this, transport, this.body.stream_options?.include_usage === true, this.body.logprobs != null);
  }
}

export function parseCompletion(raw: unknown): CompletionPlan {
  const body = parseBody(completionRequestSchema, raw);
  const n = body.n ?? 1;
  if (body.best_of != null && body.best_of < n) throw invalidRequest(`'best_of' (${body.best_of}) must be at least 'n' (${n}).`, "best_of", "invalid_value");
  if (body.best_of != null && body.best_of > n && body.stream === true) throw invalidRequest("'best_of' greater than 'n' cannot be streamed: the best are known only at the end.", "best_of", "invalid_value");
  if (body.max_tokens === 0 && !(body.echo === true && body.logprobs != null)) {
    throw invalidRequest("'max_tokens' 0 only scores the prompt: send it with 'echo': true and 'logprobs'.", "max_tokens", "invalid_value");
  }
  return new CompletionPlan(body);
}
