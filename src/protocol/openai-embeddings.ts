/** OpenAI Embeddings (`POST /v1/embeddings`), with vLLM's `truncate_prompt_tokens`. */
import { z } from "zod";
import type { Token } from "../engine/types.js";
import { ApiError, invalidRequest } from "../errors.js";
import type { EmbeddingModel, EmbeddingPlan, EmbeddingResult } from "../service/generation.js";
import { refuseSurelyTooLong } from "../service/sampling.js";
import { parseBody } from "./openai-common.js";

/** OpenAI's own limit on inputs per request. */
const MAX_INPUTS = 2048;

type Input = string | string[] | number[] | number[][];

/** Checked by a loop, not a zod union: a union over many token ids is slow (see completions). */
function isInput(v: unknown): v is Input {
  if (typeof v === "string") return true;
  if (!Array.isArray(v) || v.length === 0 || v.length > MAX_INPUTS * 16384) return false;
  const ids = (a: unknown[]) => a.length > 0 && a.every((x) => typeof x === "number" && Number.isInteger(x) && x >= 0);
  if (typeof v[0] === "string") return v.length <= MAX_INPUTS && v.every((x) => typeof x === "string");
  if (typeof v[0] === "number") return ids(v);
  return v.length <= MAX_INPUTS && v.every((x) => Array.isArray(x) && ids(x));
}

export const embeddingRequestSchema = z.strictObject({
  model: z.string().min(1),
  input: z.custom<Input>(isInput, `expected a string, a list of at most ${MAX_INPUTS} strings, a list of token ids, or a list of such lists`),
  encoding_format: z.enum(["float", "base64"]).nullable().optional(),
  dimensions: z.number().int().min(1).nullable().optional(),
  user: z.string().max(256).nullable().optional(),
  /** vLLM: keep only the last N tokens of an input that is too long (-1: the context's size). */
  truncate_prompt_tokens: z.number().int().min(-1).nullable().optional(),
});

export type EmbeddingRequest = z.infer<typeof embeddingRequestSchema>;

export class EmbeddingsPlan implements EmbeddingPlan {
  constructor(readonly body: EmbeddingRequest) {}

  get model(): string {
    return this.body.model;
  }

  get user(): string | undefined {
    return this.body.user ?? undefined;
  }

  prepare(model: EmbeddingModel): { inputs: Token[][]; dimensions: number | undefined } {
    const b = this.body;
    const raw = b.input;
    const list: Array<string | number[]> = typeof raw === "string" ? [raw] : typeof raw[0] === "number" ? [raw as number[]] : (raw as Array<string | number[]>);
    const truncate = b.truncate_prompt_tokens === -1 ? model.ctxSize : (b.truncate_prompt_tokens ?? undefined);
    if (truncate !== undefined && (truncate < 1 || truncate > model.ctxSize)) {
      throw invalidRequest(`Invalid value for 'truncate_prompt_tokens': between 1 and the context's ${model.ctxSize} tokens (or -1).`, "truncate_prompt_tokens", "invalid_value");
    }
    const inputs = list.map((item, i) => {
      const param = typeof raw === "string" || typeof raw[0] === "number" ? "input" : `input[${i}]`;
      let tokens: Token[];
      if (typeof item === "string") {
        if (item === "") throw invalidRequest(`Invalid value for '${param}': empty.`, param, "invalid_value");
        if (truncate === undefined) refuseSurelyTooLong(item.length, model, param);
        tokens = model.tokenize(item);
      } else {
        const bad = item.find((t) => !model.isValidToken(t));
        if (bad !== undefined) throw invalidRequest(`Invalid value for '${param}': token id ${bad} is outside the vocabulary.`, param, "invalid_value");
        tokens = item as Token[];
      }
      if (tokens.length > model.ctxSize) {
        // Never silently: only when the client asked for it.
        if (truncate === undefined) {
          throw new ApiError("invalid_request", `'${param}' has ${tokens.length} tokens; this model embeds at most ${model.ctxSize} (or send truncate_prompt_tokens).`, {
            param,
            code: "context_length_exceeded",
          });
        }
      }
      return truncate !== undefined && tokens.length > truncate ? tokens.slice(-truncate) : tokens;
    });
    let dimensions: number | undefined;
    if (b.dimensions != null && b.dimensions !== model.embeddingSize) {
      if (!model.dimensions.includes(b.dimensions)) {
        const allowed = model.dimensions.length > 0 ? `it supports ${model.dimensions.join(", ")} (and ${model.embeddingSize})` : `it declares no shorter vectors (its vectors have ${model.embeddingSize} dimensions)`;
        throw invalidRequest(`Invalid value for 'dimensions': ${b.dimensions}: ${allowed}.`, "dimensions", "unsupported_value");
      }
      dimensions = b.dimensions;
    }
    return { inputs, dimensions };
  }

  /** OpenAI's list of embeddings; base64 is the float32 little-endian bytes of each vector. */
  answer(r: EmbeddingResult) {
    const base64 = this.body.encoding_format === "base64";
    return {
      object: "list",
      model: r.model,
      data: r.vectors.map((v, index) => ({
        object: "embedding",
        index,
        embedding: base64 ? Buffer.from(new Float32Array(v).buffer).toString("base64") : v,
      })),
      usage: { prompt_tokens: r.promptTokens, total_tokens: r.promptTokens },
    };
  }
}

export function parseEmbeddings(raw: unknown): EmbeddingsPlan {
  return new EmbeddingsPlan(parseBody(embeddingRequestSchema, raw));
}
