import { z } from "zod";
import { invalidRequest } from "../errors.js";
import { samplingFields } from "./common.js";

export const completionRequestSchema = z.strictObject({
  ...samplingFields,
  prompt: z.union([z.string(), z.array(z.string()), z.array(z.number().int().min(0)).min(1), z.array(z.array(z.number()))]),
  echo: z.boolean().nullable().optional(),
  logprobs: z.null().optional(),
  best_of: z.literal(1).nullable().optional(),
});

export type CompletionRequest = z.infer<typeof completionRequestSchema>;

/** The prompt as text or as token ids; batches of prompts are refused for now. */
export function completionPrompt(req: CompletionRequest): { text: string } | { tokens: number[] } {
  const p = req.prompt;
  if (typeof p === "string") return { text: p };
  if (p.length === 1 && typeof p[0] === "string") return { text: p[0] };
  if (p.length > 0 && p.every((x) => typeof x === "number")) return { tokens: p as number[] };
  throw invalidRequest("A list of prompts is not supported yet: send one prompt (a string, or an array of token ids) per request.", "prompt", "unsupported_value");
}
