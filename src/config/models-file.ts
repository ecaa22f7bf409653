/**
 * models.yaml: the model repository as written by an operator. Two shapes are read:
 *
 *  - the first one, a model per entry with its `file` (one version, named by `version`
 *    or by its sha256's first 12 digits);
 *  - the second one, a model with `versions` (each an immutable artifact pinned by
 *    sha256), a `default_version`, `pinned`, a `canary` and a `shadow` policy, a
 *    `warmup` fixture; plus top-level `aliases` (name -> id@version).
 *
 * Both become one RepositoryConfig. What changes at run time (promotions, canary
 * weights) lives in the state file (src/models/repository-state.ts), never here.
 */
import { readFileSync } from "node:fs";
import { dirname, isAbsolute, resolve } from "node:path";
import { parse as parseYaml } from "yaml";
import { z } from "zod";
import { DEFAULT_DRAFT_MIN_CONFIDENCE, DEFAULT_DRAFT_TOKENS, KV_CACHE_TYPES, type KvCacheType, type SlotClass, type SpeculativeOptions } from "../engine/types.js";
import { ConfigError } from "../errors.js";

const ID_PATTERN = /^[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}$/;

/** The rule every model id and alias obeys, wherever it enters (models file, --model, the admin API, the state file). */
export function isValidName(name: string): boolean {
  return ID_PATTERN.test(name);
}
const VERSION_PATTERN = /^[A-Za-z0-9][A-Za-z0-9._\-]*$/;

const samplingSchema = z.strictObject({
  temperature: z.number().min(0).max(2).optional(),
  top_p: z.number().gt(0).max(1).optional(),
  top_k: z.number().int().min(0).optional(),
  max_tokens: z.number().int().positive().optional(),
  presence_penalty: z.number().min(-2).max(2).optional(),
  frequency_penalty: z.number().min(-2).max(2).optional(),
});

/** What a version runs with: shared by both shapes. */
const runtimeFields = {
  /** The GGUF file, relative to the models file. */
  file: z.string().min(1),
  /** Where a missing file can be fetched from, tried in order: http(s) URLs or local paths. */
  sources: z.array(z.string().min(1)).optional(),
  /** A built-in chat wrapper name (e.g. chatML, llama3, general) or a path to a Jinja file. */
  chat_template: z.string().min(1).optional(),
  ctx_size: z.number().int().min(16).optional(),
  parallel: z.number().int().min(1).max(256).optional(),
  /** Slot classes instead of parallel × ctx_size: one context per class, smallest first. */
  slots: z.array(z.strictObject({ count: z.number().int().min(1).max(256), ctx_size: z.number().int().min(16) })).min(1).max(8).optional(),
  /** Layers offloaded to the GPU: a number, or "max" (all). Ignored on the CPU backend. */
  gpu_layers: z.union([z.number().int().min(0), z.literal("max")]).optional(),
  threads: z.number().int().min(1).max(1024).optional(),
  /**
   * Speculative decoding (vLLM's speculative_config names): prompt lookup (`method: ngram`),
   * or a draft model (`model`: a GGUF with the same tokenizer, relative to the models file,
   * optionally pinned by `sha256`; `method` may be left out or given as draft/draft_model).
   */
  speculative: z
    .union([
      z.strictObject({
        method: z.literal("ngram"),
        num_speculative_tokens: z.number().int().min(1).max(16).optional(),
        prompt_lookup_min: z.number().int().min(1).max(16).optional(),
        disable_by_batch_size: z.number().int().min(1).max(256).optional(),
      }),
      z.strictObject({
        method: z.enum(["draft", "draft_model"]).optional(),
        model: z.string().min(1),
        sha256: z.string().regex(/^[0-9a-fA-F]{64}$/, "64 hex digits").optional(),
        num_speculative_tokens: z.number().int().min(1).max(64).optional(),
        /** The draft stops at a token it gives less probability than this (llama-server's --draft-p-min). */
        draft_p_min: z.number().min(0).max(1).optional(),
        /** No guesses while more generations than this run on the version (vLLM's name); default 1. */
        disable_by_batch_size: z.number().int().min(1).max(256).optional(),
      }),
    ])
    .optional(),
  /** KV cache element types (llama-server's names); f16 by default. */
  cache_type_k: z.enum(KV_CACHE_TYPES).optional(),
  cache_type_v: z.enum(KV_CACHE_TYPES).optional(),
  /** false: read the weights into memory instead of mapping the file (llama-server's --no-mmap). */
  mmap: z.boolean().optional(),
  sampling: samplingSchema.optional(),
  /** Serve /v1/embeddings too (an embedding context of its own); `dimensions`: the truncations the model supports (Matryoshka). */
  embeddings: z.union([z.boolean(), z.strictObject({ dimensions: z.array(z.number().int().min(1)).max(64).optional() })]).optional(),
  /** Provenance, reported as given. */
  license: z.string().optional(),
  source: z.string().optional(),
};

const versionSchema = z.strictObject({
  name: z.string().regex(VERSION_PATTERN, "letters, digits, '.', '_' and '-' only"),
  /** Required: a version is the artifact with this hash, nothing else. */
  sha256: z.string().regex(/^[0-9a-fA-F]{64}$/, "64 hex digits"),
  ...runtimeFields,
});

const trafficSchema = z.strictObject({
  version: z.string().regex(VERSION_PATTERN),
  weight: z.number().min(0).max(1),
});

const warmupSchema = z.strictObject({
  prompt: z.string().min(1),
  max_tokens: z.number().int().min(1).max(256),
});

const singleFileModel = z.strictObject({
  id: z.string().regex(ID_PATTERN, "letters, digits, '.', '_', ':' and '-' only"),
  /** A name for this artifact (labels metrics, logs and traces); default: the sha256's first 12 digits. */
  version: z.string().regex(VERSION_PATTERN, "letters, digits, '.', '_' and '-' only").optional(),
  sha256: z.string().regex(/^[0-9a-fA-F]{64}$/, "64 hex digits").optional(),
  pinned: z.boolean().optional(),
  warmup: warmupSchema.optional(),
  ...runtimeFields,
});

const versionedModel = z.strictObject({
  id: z.string().regex(ID_PATTERN, "letters, digits, '.', '_', ':' and '-' only"),
  versions: z.array(versionSchema).min(1),
  /** The version the bare id serves until an operator promotes another; default: the last listed. */
  default_version: z.string().regex(VERSION_PATTERN).optional(),
  /** Never evicted; its default version loads at start and readiness waits for it. */
  pinned: z.boolean().optional(),
  canary: trafficSchema.optional(),
  shadow: trafficSchema.optional(),
  warmup: warmupSchema.optional(),
});

const modelsFileSchema = z.strictObject({
  models: z.array(z.union([versionedModel, singleFileModel])).min(1),
  /** alias -> "id@version" */
  aliases: z.record(z.string().regex(ID_PATTERN), z.string().min(3)).optional(),
});

export type SamplingDefaults = z.infer<typeof samplingSchema>;

/** One immutable model version as the rest of the server sees it: paths resolved. */
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
  gpuLayers?: number | "max";
  threads?: number;
  /** Slot classes (count × tokens), smallest first; instead of parallel × ctxSize. */
  slots?: SlotClass[];
  cacheTypeK?: KvCacheType;
  cacheTypeV?: KvCacheType;
  /** false: the weights are read into memory, not mapped (--no-mmap). */
  mmap?: boolean;
  speculative?: SpeculativeOptions;
  /** Serves embeddings; `dimensions`: the shorter vectors clients may ask for. */
  embeddings?: { dimensions: number[] };
  license?: string;
  source?: string;
}

export interface TrafficSplit {
  version: string;
  /** Share of the id's requests, 0..1. */
  weight: number;
}

export interface WarmupFixture {
  prompt: string;
  maxTokens: number;
}

export interface ModelConfig {
  id: string;
  versions: ModelSpec[];
  defaultVersion: string;
  pinned: boolean;
  canary: TrafficSplit | undefined;
  shadow: TrafficSplit | undefined;
  warmup: WarmupFixture;
}

export interface RepositoryConfig {
  models: ModelConfig[];
  /** alias -> { id, version } */
  aliases: Record<string, { id: string; version: string }>;
}

export const DEFAULT_WARMUP: WarmupFixture = { prompt: "Hello", maxTokens: 4 };

/** "id@version" -> parts; undefined when the text has no '@'. */
export function splitVersioned(name: string): { id: string; version: string } | undefined {
  const at = name.lastIndexOf("@");
  if (at <= 0 || at === name.length - 1) return undefined;
  return { id: name.slice(0, at), version: name.slice(at + 1) };
}

/** One model per spec, one version each: what --model and the tests give. */
export function repositoryFromSpecs(specs: ModelSpec[]): RepositoryConfig {
  const byId = new Map<string, ModelConfig>();
  for (const s of specs) {
    const m = byId.get(s.id);
    if (m) {
      m.versions.push(s);
      continue;
    }
    byId.set(s.id, { id: s.id, versions: [s], defaultVersion: s.version, pinned: false, canary: undefined, shadow: undefined, warmup: DEFAULT_WARMUP });
  }
  return { models: [...byId.values()], aliases: {} };
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

/** A union failure reports "invalid input"; name the branch the entry meant instead. */
function firstIssue(doc: unknown, error: z.ZodError): z.core.$ZodIssue {
  const issue = error.issues[0]!;
  if (issue.code !== "invalid_union") return issue;
  const entry = (doc as { models?: Array<Record<string, unknown>> }).models?.[issue.path[1] as number];
  const branch = entry && "versions" in entry ? 0 : 1;
  const inner = issue.errors[branch]?.[0];
  return inner ? { ...inner, path: [...issue.path, ...inner.path] } : issue;
}

/** What a model version is called when the file does not name it. */
export function versionName(explicit: string | undefined, sha256: string | undefined): string {
  return explicit ?? (sha256 ? sha256.slice(0, 12).toLowerCase() : "unversioned");
}

export function parseModelsFile(text: string, file: string): RepositoryConfig {
  let doc: unknown;
  try {
    doc = parseYaml(text);
  } catch (err) {
    throw new ConfigError(`${file}: not valid YAML: ${(err as Error).message.split("\n")[0]}`);
  }
  const result = modelsFileSchema.safeParse(doc);
  if (!result.success) throw new ConfigError(`${file}: ${describeIssue(doc, firstIssue(doc, result.error))}`);
  const base = dirname(resolve(file));
  const rel = (p: string) => (isAbsolute(p) ? p : resolve(base, p));
  const runtime = (id: string, version: string, sha: string | undefined, r: z.infer<z.ZodObject<typeof runtimeFields>>): ModelSpec => {
    if (r.slots && (r.parallel !== undefined || r.ctx_size !== undefined)) {
      throw new ConfigError(`${file}: model "${id}" version "${version}", field slots: give slots, or parallel and ctx_size, not both`);
    }
    return runtimeSpec(id, version, sha, r);
  };
  const runtimeSpec = (id: string, version: string, sha: string | undefined, r: z.infer<z.ZodObject<typeof runtimeFields>>): ModelSpec => ({
    id,
    version,
    path: rel(r.file),
    sha256: sha?.toLowerCase(),
    sources: (r.sources ?? []).map((s) => (/^https?:\/\//.test(s) ? s : rel(s))),
    // A template that looks like a file is resolved against the models file; a bare name is a built-in.
    chatTemplate: r.chat_template && /[\\/]|\.jinja2?$/.test(r.chat_template) ? rel(r.chat_template) : r.chat_template,
    ctxSize: r.ctx_size,
    parallel: r.parallel,
    sampling: r.sampling ?? {},
    gpuLayers: r.gpu_layers,
    threads: r.threads,
    slots: r.slots ? normalizeSlots(r.slots.map((c) => ({ count: c.count, ctxSize: c.ctx_size }))) : undefined,
    speculative: speculationOf(r.speculative),
    cacheTypeK: r.cache_type_k,
    cacheTypeV: r.cache_type_v,
    mmap: r.mmap,
    embeddings: r.embeddings === true ? { dimensions: [] } : r.embeddings ? { dimensions: r.embeddings.dimensions ?? [] } : undefined,
    license: r.license,
    source: r.source,
  });
  const speculationOf = (sp: z.infer<typeof runtimeFields.speculative>): SpeculativeOptions | undefined => {
    if (!sp) return undefined;
    const gate = sp.disable_by_batch_size !== undefined ? { disableByBatchSize: sp.disable_by_batch_size } : {};
    if (sp.method === "ngram") return { method: "ngram", tokens: sp.num_speculative_tokens ?? 3, minPattern: sp.prompt_lookup_min ?? 1, ...gate };
    return { method: "draft", tokens: sp.num_speculative_tokens ?? DEFAULT_DRAFT_TOKENS, path: rel(sp.model), sha256: sp.sha256?.toLowerCase(), minConfidence: sp.draft_p_min ?? DEFAULT_DRAFT_MIN_CONFIDENCE, ...gate };
  };
  const seen = new Set<string>();
  const models: ModelConfig[] = result.data.models.map((m) => {
    const where = `${file}: model "${m.id}"`;
    if (seen.has(m.id)) throw new ConfigError(`${where}, field id: duplicate id`);
    seen.add(m.id);
    const warmup = m.warmup ? { prompt: m.warmup.prompt, maxTokens: m.warmup.max_tokens } : DEFAULT_WARMUP;
    if (!("versions" in m)) {
      const spec = runtime(m.id, versionName(m.version, m.sha256), m.sha256, m);
      return { id: m.id, versions: [spec], defaultVersion: spec.version, pinned: m.pinned ?? false, canary: undefined, shadow: undefined, warmup };
    }
    const names = new Set<string>();
    const versions = m.versions.map((v) => {
      if (names.has(v.name)) throw new ConfigError(`${where}, field versions: version "${v.name}" listed twice (versions are immutable: give a changed artifact a new name)`);
      names.add(v.name);
      return runtime(m.id, v.name, v.sha256, v);
    });
    const known = (field: string, v: string | undefined) => {
      if (v !== undefined && !names.has(v)) throw new ConfigError(`${where}, field ${field}: no version named "${v}"`);
    };
    known("default_version", m.default_version);
    known("canary.version", m.canary?.version);
    known("shadow.version", m.shadow?.version);
    return {
      id: m.id,
      versions,
      defaultVersion: m.default_version ?? versions[versions.length - 1]!.version,
      pinned: m.pinned ?? false,
      canary: m.canary,
      shadow: m.shadow,
      warmup,
    };
  });
  const aliases: RepositoryConfig["aliases"] = {};
  for (const [alias, target] of Object.entries(result.data.aliases ?? {})) {
    if (seen.has(alias)) throw new ConfigError(`${file}: alias "${alias}" is also a model id`);
    const t = splitVersioned(target);
    const model = t && models.find((m) => m.id === t.id);
    if (!t || !model || !model.versions.some((v) => v.version === t.version)) {
      throw new ConfigError(`${file}: alias "${alias}": target "${target}" is not an id@version listed in the file`);
    }
    aliases[alias] = t;
  }
  return { models, aliases };
}

export function loadModelsFile(file: string): RepositoryConfig {
  let text: string;
  try {
    text = readFileSync(file, "utf8");
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === "ENOENT") throw new ConfigError(`cannot read models file ${file}: it does not exist (pass --config FILE, or --model PATH to serve a GGUF file without one)`);
    if (code === "EACCES") throw new ConfigError(`cannot read models file ${file}: permission denied`);
    if (code === "EISDIR") throw new ConfigError(`cannot read models file ${file}: it is a directory`);
    throw new ConfigError(`cannot read models file ${file}: ${code ?? (err as Error).message}`);
  }
  return parseModelsFile(text, file);
}

/** Slot classes smallest first, classes of one size merged. */
export function normalizeSlots(classes: Array<{ count: number; ctxSize: number }>): SlotClass[] {
  const bySize = new Map<number, number>();
  for (const c of classes) bySize.set(c.ctxSize, (bySize.get(c.ctxSize) ?? 0) + c.count);
  return [...bySize.entries()].sort((a, b) => a[0] - b[0]).map(([ctxSize, count]) => ({ count, ctxSize }));
}
