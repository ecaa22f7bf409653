/** OpenAI (legacy) Completions: the request schema, how it becomes a generation, and its answers. */
import { randomBytes } from "node:crypto";
import { z } from "zod";
import type { Token } from "../engine/types.js";
import { ApiError, invalidRequest } from "../errors.js";
import type { GenerationPlan, PreparedPrompt, PromptModel } from "../service/generation.js";
import { refuseSurelyTooLong, resolveMaxTokens, samplingParams } from "../service/sampling.js";
import { parseBody, samplingFields, stopList } from "./openai-common.js";
import { ChunkStream, JsonAnswer, type AnswerShape, type StreamTransport } from "./openai-output.js";

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
  prompt: z.custom<Prompt>(isPrompt, "expected a string, a list of strings, a list of token ids, or a list of lists of token ids"),
  echo: z.boolean().nullable().optional(),
  logprobs: z.null().optional(),
  best_of: z.literal(1).nullable().optional(),
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
    const maxTokens = resolveMaxTokens(tokens.length, body.max_tokens ?? undefined, model.sampling.max_tokens ?? TEXT_DEFAULT_MAX_TOKENS, model.ctxSize, {
      prompt: "prompt",
      maxTokens: "max_tokens",
    });
    // The version that answers prepares first; a shadow's preparation must not change the echo.
    if (!this.prepared) this.echoText = body.echo === true ? ("text" in prompt ? prompt.text : model.detokenize(tokens)) : "";
    this.prepared = true;
    return { promptTokens: tokens, maxTokens, stop: stopList(body.stop), sampling: samplingParams(body, model) };
  }

  jsonAnswer(): JsonAnswer {
    return new JsonAnswer(this);
  }

  streamAnswer(transport: StreamTransport): ChunkStream {
    return new ChunkStream(this, transport, this.body.stream_options?.include_usage === true);
  }
}

export function parseCompletion(raw: unknown): CompletionPlan {
  return new CompletionPlan(parseBody(completionRequestSchema, raw));
}
