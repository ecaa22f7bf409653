import { readFileSync } from "node:fs";
import { dirname, isAbsolute, resolve } from "node:path";
import { parse as parseYaml } from "yaml";
import { z } from "zod";
import { ConfigError } from "./cli.js";

const samplingSchema = z.strictObject({
  temperature: z.number().min(0).max(2).optional(),
  top_p: z.number().gt(0).max(1).optional(),
  top_k: z.number().int().min(0).optional(),
  max_tokens: z.number().int().positive().optional(),
  presence_penalty: z.number().min(-2).max(2).optional(),
  frequency_penalty: z.number().min(-2).max(2).optional(),
});

const modelEntrySchema = z.strictObject({
  id: z.string().regex(/^[A-Za-z0-9][A-Za-z0-9._:\-]*$/, "letters, digits, '.', '_', ':' and '-' only"),
  /** A name for this artifact (labels metrics, logs and traces); default: the sha256's first 12 digits. */
  version: z.string().regex(/^[A-Za-z0-9][A-Za-z0-9._\-]*$/, "letters, digits, '.', '_' and '-' only").optional(),
  /** The GGUF file, relative to the models file. */
  file: z.string().min(1),
  /** Hex sha256 of the file; when set, the file is checked before use. */
  sha256: z.string().regex(/^[0-9a-fA-F]{64}$/, "64 hex digits").optional(),
  /** Where a missing file can be fetched from, tried in order: http(s) URLs or local paths. */
  sources: z.array(z.string().min(1)).optional(),
  /** A built-in chat wrapper name (e.g. chatML, llama3, general) or a path to a Jinja file. */
  chat_template: z.string().min(1).optional(),
  ctx_size: z.number().int().min(16).optional(),
  parallel: z.number().int().min(1).max(256).optional(),
  sampling: samplingSchema.optional(),
});

const modelsFileSchema = z.strictObject({
  models: z.array(modelEntrySchema).min(1),
});

export type SamplingDefaults = z.infer<typeof samplingSchema>;

/** One model as the rest of the server sees it: paths resolved, nothing optional that has a default. */
export interface ModelSpec {
  id: string;
  version: string;
  path: string;
  sha256: string | undefined;
  sources: string[];
  chatTemplate: string | undefined;
  ctxSize: number | undefined;
  parallel: number | undefined;
  sampling: SamplingDefaults;
}

function describeIssue(doc: unknown, issue: z.core.$ZodIssue): string {
  const path = issue.path;
  if (path[0] === "models" && typeof path[1] === "number") {
    const entry = (doc as { models?: Array<{ id?: unknown }> }).models?.[path[1]];
    const name = typeof entry?.id === "string" ? `model "${entry.id}"` : `models[${path[1]}]`;
    const field = path.slice(2).join(".") || "(entry)";
    return `${name}, field ${field}: ${issue.message}`;
  }
  return `${path.join(".") || "(top level)"}: ${issue.message}`;
}

/** What a model version is called when the file does not name it. */
export function versionName(explicit: string | undefined, sha256: string | undefined): string {
  return explicit ?? (sha256 ? sha256.slice(0, 12).toLowerCase() : "unversioned");
}

export function parseModelsFile(text: string, file: string): ModelSpec[] {
  let doc: unknown;
  try {
    doc = parseYaml(text);
  } catch (err) {
    throw new ConfigError(`${file}: not valid YAML: ${(err as Error).message.split("\n")[0]}`);
  }
  const result = modelsFileSchema.safeParse(doc);
  if (!result.success) {
    const issue = result.error.issues[0]!;
    throw new ConfigError(`${file}: ${describeIssue(doc, issue)}`);
  }
  const base = dirname(resolve(file));
  const seen = new Set<string>();
  return result.data.models.map((m) => {
    if (seen.has(m.id)) throw new ConfigError(`${file}: model "${m.id}", field id: duplicate id`);
    seen.add(m.id);
    const rel = (p: string) => (isAbsolute(p) ? p : resolve(base, p));
    return {
      id: m.id,
      version: versionName(m.version, m.sha256),
      path: rel(m.file),
      sha256: m.sha256?.toLowerCase(),
      sources: (m.sources ?? []).map((s) => (/^https?:\/\//.test(s) ? s : rel(s))),
      // A template that looks like a file is resolved against the models file; a bare name is a built-in.
      chatTemplate: m.chat_template && /[\\/]|\.jinja2?$/.test(m.chat_template) ? rel(m.chat_template) : m.chat_template,
      ctxSize: m.ctx_size,
      parallel: m.parallel,
      sampling: m.sampling ?? {},
    };
  });
}

export function loadModelsFile(file: string): ModelSpec[] {
  let text: string;
  try {
    text = readFileSync(file, "utf8");
  } catch (err) {
    throw new ConfigError(`cannot read models file ${file}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
  return parseModelsFile(text, file);
}
