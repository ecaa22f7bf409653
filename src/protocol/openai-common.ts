/**
 * What the OpenAI APIs share: the sampling and stopping fields, their bounds, and zod
 * issues turned into OpenAI's 400 envelope naming the parameter.
 */
import { z } from "zod";
import { ApiError, invalidRequest } from "../errors.js";

export const LIMITS = {
  maxStopEntries: 16,
  maxStopLength: 512,
  maxLogitBiasEntries: 1024,
  maxMessages: 4096,
  maxChoices: 16,
  maxTools: 128,
  maxStopTokenIds: 64,
} as const;

const nullish = <T extends z.ZodType>(t: T) => t.nullable().optional();

/** Sampling and stopping fields shared by chat and completions. */
export const samplingFields = {
  model: z.string().min(1, "must not be empty"),
  max_tokens: nullish(z.number().int().min(0)),
  temperature: nullish(z.number().min(0).max(2)),
  top_p: nullish(z.number().min(0).max(1)),
  seed: nullish(z.number().int().min(-(2 ** 63)).max(2 ** 64)),
  stop: nullish(
    z.union([
      z.string().min(1).max(LIMITS.maxStopLength),
      z.array(z.string().min(1).max(LIMITS.maxStopLength)).max(LIMITS.maxStopEntries),
    ]),
  ),
  presence_penalty: nullish(z.number().min(-2).max(2)),
  frequency_penalty: nullish(z.number().min(-2).max(2)),
  logit_bias: nullish(
    z.record(z.string().regex(/^\d+$/, "keys must be token ids"), z.number().min(-100).max(100)).refine(
      (r) => Object.keys(r).length <= LIMITS.maxLogitBiasEntries,
      `at most ${LIMITS.maxLogitBiasEntries} entries`,
    ),
  ),
  stream: nullish(z.boolean()),
  stream_options: nullish(z.strictObject({ include_usage: nullish(z.boolean()) })),
  user: nullish(z.string().max(256)),
  // vLLM's and llama-server's extensions: top-k sampling (0 or -1 = off), min-p, the
  // repeat penalty (under both names), a minimum length, stop token ids, and generating
  // exactly max_tokens (benchmarks).
  top_k: nullish(z.number().int().min(-1).max(1 << 20)),
  min_p: nullish(z.number().min(0).max(1)),
  repetition_penalty: nullish(z.number().gt(0).max(10)),
  repeat_penalty: nullish(z.number().gt(0).max(10)),
  repeat_last_n: nullish(z.number().int().min(0).max(1 << 16)),
  min_tokens: nullish(z.number().int().min(0)),
  stop_token_ids: nullish(z.array(z.number().int().min(0)).max(LIMITS.maxStopTokenIds)),
  include_stop_str_in_output: nullish(z.boolean()),
  // typical sampling is not in node-llama-cpp's sampler: only "off" (1) is accepted.
  typical_p: nullish(z.literal(1, { message: "only 1 (off) is supported: node-llama-cpp does not expose llama.cpp's typical sampler" })),
  ignore_eos: nullish(z.boolean()),
  n: nullish(z.number().int().min(1).max(LIMITS.maxChoices)),
};

/** Known OpenAI fields this server does not implement: refused by name, never ignored. */
export const UNSUPPORTED_HINT: Record<string, string> = {
  functions: "the legacy functions field is not supported: send tools",
  function_call: "the legacy function_call field is not supported: send tool_choice",
  audio: "audio output is not supported",
  prediction: "predicted outputs are not supported",
  suffix: "suffix (insertion) is not supported",
  web_search_options: "web search is not supported",
  verbosity: "verbosity is not supported by the served models",
};

function paramPath(path: readonly PropertyKey[]): string | null {
  if (path.length === 0) return null;
  let out = "";
  for (const p of path) out += typeof p === "number" ? `[${p}]` : out === "" ? String(p) : `.${String(p)}`;
  return out;
}

/** The first zod issue as an OpenAI-style 400 that names the field. */
function valueAt(body: unknown, path: readonly PropertyKey[]): unknown {
  let v: unknown = body;
  for (const p of path) {
    if (v === null || typeof v !== "object" || !Object.hasOwn(v, p)) return undefined;
    v = (v as Record<PropertyKey, unknown>)[p];
  }
  return v;
}

export function zodToApiError(error: z.ZodError, body: unknown): ApiError {
  const issue = error.issues[0]!;
  if (issue.code === "unrecognized_keys") {
    const key = issue.keys[0]!;
    const parent = paramPath(issue.path);
    const param = parent ? `${parent}.${key}` : key;
    const hint = parent === null ? UNSUPPORTED_HINT[key] : undefined;
    return invalidRequest(`Unsupported parameter: '${param}'${hint ? `: ${hint}` : " is not supported by this server"}.`, param, "unsupported_parameter");
  }
  const param = paramPath(issue.path);
  const value = valueAt(body, issue.path);
  if (value === undefined) {
    return invalidRequest(`Missing required parameter: '${param}'.`, param, "missing_required_parameter");
  }
  const type = value === null ? "null" : Array.isArray(value) ? "array" : typeof value;
  const what = issue.code === "invalid_type" ? `expected ${issue.expected}, got ${type}` : issue.message;
  return invalidRequest(`Invalid value for '${param ?? "body"}': ${what}.`, param, "invalid_value");
}

export function parseBody<T extends z.ZodType>(schema: T, body: unknown): z.infer<T> {
  if (body === null || typeof body !== "object" || Array.isArray(body)) {
    throw invalidRequest("The request body must be a JSON object.", null, "invalid_body");
  }
  const result = schema.safeParse(body);
  if (!result.success) throw zodToApiError(result.error, body);
  return result.data;
}

export function stopList(stop: string | string[] | null | undefined): string[] {
  if (stop === null || stop === undefined) return [];
  return typeof stop === "string" ? [stop] : stop;
}

/**
 * Refuses content parts a text model cannot read, by their type's name, before the body
 * is parsed (the schema would only say "invalid"). `list` is the request's list of
 * messages or items; `kinds` names each refused part type; `where(i, j)` spells the
 * part's path as this API spells paths.
 */
export function refuseMediaParts(list: unknown, kinds: Record<string, string>, where: (i: number, j: number) => string, noun = "parts"): void {
  if (!Array.isArray(list)) return;
  list.forEach((m, i) => {
    const parts = (m as { content?: unknown })?.content;
    if (!Array.isArray(parts)) return;
    parts.forEach((p, j) => {
      const type = (p as { type?: unknown })?.type;
      if (typeof type === "string" && Object.hasOwn(kinds, type)) {
        const path = where(i, j);
        throw invalidRequest(`Invalid value for '${path}': ${kinds[type]} ('${type}' ${noun}) is not supported: the served models read text only.`, `${path}.type`, "unsupported_content");
      }
    });
  });
}
