/**
 * Every server option, declared once: its flag, environment variable, argument, default
 * and help text, and how its value is read. The command-line parser, `--help`, the
 * tests' defaults and the README's option table all derive from this list (a test
 * fails when the README's table differs from it).
 */
import { availableParallelism } from "node:os";
import { resolve } from "node:path";
import { STEP_THREADS, type StepThread } from "../engine/step-thread.js";
import { DEFAULT_DRAFT_MIN_CONFIDENCE, DEFAULT_DRAFT_TOKENS, ENGINE_BINARIES, KV_CACHE_TYPES, type EngineBinary, type KvCacheType, type SlotClass, type SpeculativeOptions } from "../engine/types.js";
import { ConfigError } from "../errors.js";
import { isValidName, normalizeSlots } from "./models-file.js";
import { parseSize } from "./sizes.js";

export type PublicArea = "health" | "metrics" | "page";
export const PUBLIC_AREAS: readonly PublicArea[] = ["health", "metrics", "page"];
export const GPU_CHOICES = ["auto", "cuda", "metal", "vulkan", "cpu"] as const;
export type GpuChoice = (typeof GPU_CHOICES)[number];
const LOG_LEVELS = ["fatal", "error", "warn", "info", "debug", "trace", "silent"] as const;

export interface CliModel {
  path: string;
  id: string;
}

export interface ServerOptions {
  configFile: string;
  /** True when --config/SPINDLE_CONFIG was given: then a missing file is an error. */
  configExplicit: boolean;
  models: CliModel[];
  host: string;
  port: number;
  threads: number;
  gpu: GpuChoice;
  /** Which llama.cpp binary: node-llama-cpp's prebuilt one, or one built here (npm run engine:build). */
  engineBuild: EngineBinary;
  stepThread: StepThread;
  parallel: number | undefined;
  ctxSize: number | undefined;
  /** A built-in template name or a Jinja file, for every model (overrides the models file and the GGUF's own). */
  chatTemplate: string | undefined;
  flashAttention: "auto" | "on" | "off";
  /** KV cache element types for every version (override the models file's). */
  /** Speculative decoding for every version (--speculative ngram[:N]|draft[:N], --model-draft). */
  speculative: SpeculativeOptions | undefined;
  /** The draft model's file (--model-draft); resolveSpeculation puts it into `speculative`. */
  modelDraft: string | undefined;
  draftMinConfidence: number;
  speculativeDisableByBatchSize: number | undefined;
  /** Slot classes for every version (--slots 8x512,1x4096). */
  slots: SlotClass[] | undefined;
  cacheTypeK: KvCacheType | undefined;
  cacheTypeV: KvCacheType | undefined;
  /** Read every version's weights into memory instead of mapping the file (--no-mmap). */
  noMmap: boolean;
  maxQueue: number;
  maxQueuedTokens: number;
  /** Arrivals at an idle slot class wait this fraction of a recent step for others arriving with them. */
  schedulerDelayFactor: number;
  requestTimeoutSeconds: number;
  maxBodyBytes: number;
  metrics: boolean;
  otlpEndpoint: string | undefined;
  apiKeys: string[];
  adminKeys: string[];
  apiKeysFile: string | undefined;
  publicAreas: PublicArea[];
  corsOrigins: string[];
  keyMaxConcurrent: number;
  keyTokensPerMinute: number;
  readTimeoutSeconds: number;
  shutdownGraceSeconds: number;
  /** Bytes of RAM resident model versions may take (estimated before loading); default: 70% of the machine's. */
  memoryBudget: number | undefined;
  /** Bytes of VRAM, on GPU backends; default: 90% of the device's. */
  vramBudget: number | undefined;
  /** Most model versions in memory at once; 0: no limit but the budget. */
  maxLoadedModels: number;
  /** Where promotions, rollbacks and canary weights are kept; default: beside the models file. */
  stateFile: string | undefined;
  logLevel: (typeof LOG_LEVELS)[number];
  /** Which requests may make a model version load: any name, ids and aliases only, or none (operators only). */
  loadOnDemand: LoadPolicy;
  /** The --model files serve embeddings too. */
  embeddings: boolean;
  /** Responses kept for previous_response_id and GET /v1/responses/{id}: how many, for how long. */
  responsesStoreSize: number;
  responsesStoreTtlSeconds: number;
  responsesStoreBytes: number;
  /** Open WebSocket connections, in all and per client address. */
  wsMaxConnections: number;
  wsMaxConnectionsPerClient: number;
}

export const LOAD_POLICIES = ["any", "ids", "admin"] as const;
export type LoadPolicy = (typeof LOAD_POLICIES)[number];

/**
 * One compute thread per spare core: the JavaScript thread that drives the batch loop
 * needs a core of its own (see the engine notes on threads).
 */
export function defaultThreads(): number {
  return Math.max(1, availableParallelism() - 1);
}

interface Declared<K extends keyof ServerOptions> {
  flag: string;
  env: string;
  arg: string;
  help: string;
  /** The default as people read it (help, README). */
  defaultText: string;
  field: K;
  /** Repeatable on the command line; comma-separated in the environment variable. */
  multiple?: boolean;
  /** A flag without a value (its environment variable: 1/true/on or 0/false/off). */
  boolean?: boolean;
  /** Reads the given value(s); `raw` is one string, or every occurrence for `multiple`. */
  read(raw: string[]): ServerOptions[K];
  fallback(): ServerOptions[K];
}

/** A declaration, with the type of its field checked against ServerOptions. */
function option<K extends keyof ServerOptions>(d: Declared<K>): Declared<K> {
  return d;
}

function integer(flag: string, raw: string, min: number, max: number): number {
  if (!/^\d+$/.test(raw.trim())) throw new ConfigError(`--${flag}: expected an integer, got "${raw}"`);
  const n = Number(raw);
  if (n < min || n > max) throw new ConfigError(`--${flag}: must be between ${min} and ${max}, got ${n}`);
  return n;
}

/** Seconds: positive, and small enough for a Node timer (setTimeout overflows past 2^31-1 ms). */
export const MAX_TIMER_SECONDS = Math.floor((2 ** 31 - 1) / 1000);

function seconds(flag: string, raw: string): number {
  const n = Number(raw);
  if (raw.trim() === "" || !Number.isFinite(n) || n <= 0) throw new ConfigError(`--${flag}: expected a positive number of seconds, got "${raw}"`);
  if (n > MAX_TIMER_SECONDS) throw new ConfigError(`--${flag}: at most ${MAX_TIMER_SECONDS} seconds, got ${raw}`);
  return n;
}

function choice<T extends string>(flag: string, raw: string, choices: readonly T[]): T {
  if (!(choices as readonly string[]).includes(raw)) throw new ConfigError(`--${flag}: expected one of ${choices.join("|")}, got "${raw}"`);
  return raw as T;
}

const last = (raw: string[]) => raw[raw.length - 1]!;

/** A flag without a value: the command line gives "true"; its environment variable, 1/true/on/yes or 0/false/off/no. */
function onOff(env: string, raw: string): boolean {
  const v = raw.toLowerCase();
  if (["1", "true", "on", "yes"].includes(v)) return true;
  if (["0", "false", "off", "no"].includes(v)) return false;
  throw new ConfigError(`${env}: expected on or off, got "${raw}"`);
}

/** A number from 0 to 1; `what` names it in the error. */
function fraction(flag: string, raw: string, what: string): number {
  const n = Number(raw);
  if (raw.trim() === "" || !Number.isFinite(n) || n < 0 || n > 1) throw new ConfigError(`--${flag}: expected ${what} from 0 to 1, got "${raw}"`);
  return n;
}

/** Measured on W3 (README, "Measured"): arrivals a few milliseconds apart share their first step. */
export const DEFAULT_SCHEDULER_DELAY_FACTOR = 0.1;

/** `8x512,1x4096`: counts of slots and their tokens each. */
export function parseSlots(raw: string): SlotClass[] {
  const classes = raw.split(",").map((part) => {
    const m = /^\s*(\d+)\s*x\s*(\d+)\s*$/i.exec(part);
    if (!m) throw new ConfigError(`--slots: expected COUNTxTOKENS[,COUNTxTOKENS…] such as 8x512,1x4096, got "${raw}"`);
    const count = Number(m[1]);
    const ctxSize = Number(m[2]);
    if (count < 1 || count > 256) throw new ConfigError(`--slots: a class has 1 to 256 slots, got ${count}`);
    if (ctxSize < 16) throw new ConfigError(`--slots: a slot has at least 16 tokens, got ${ctxSize}`);
    return { count, ctxSize };
  });
  if (classes.length > 8) throw new ConfigError("--slots: at most 8 classes");
  return normalizeSlots(classes);
}

export function parseModelArg(raw: string): CliModel {
  const eq = raw.lastIndexOf("=");
  const path = eq > 0 ? raw.slice(0, eq) : raw;
  const explicitId = eq > 0 ? raw.slice(eq + 1) : "";
  if (path === "") throw new ConfigError(`--model: empty path in "${raw}"`);
  const base = path.split(/[\\/]/).pop() ?? path;
  const id = explicitId !== "" ? explicitId : base.replace(/\.gguf$/i, "");
  if (!isValidName(id)) {
    throw new ConfigError(`--model: invalid model id "${id}" (letters, digits, '.', '_', ':' and '-')`);
  }
  return { path, id };
}

function keys(flag: string, raw: string[]): string[] {
  for (const k of raw) if (k.length < 8) throw new ConfigError(`--${flag}: keys must be at least 8 characters`);
  return raw;
}

export const OPTIONS = [
  option({
    flag: "config", env: "SPINDLE_CONFIG", arg: "FILE", field: "configFile", defaultText: "`models.yaml`",
    help: "the models file",
    read: last, fallback: () => "models.yaml",
  }),
  option({
    flag: "model", env: "SPINDLE_MODEL", arg: "PATH[=ID]", field: "models", defaultText: "–", multiple: true,
    help: "serve these GGUF files instead of a models file; repeatable; ID defaults to the file name without `.gguf`; a directory stands for the one `.gguf` in it (KServe's `/mnt/models`)",
    read: (raw) => {
      const models = raw.map(parseModelArg);
      const ids = new Set<string>();
      for (const m of models) {
        if (ids.has(m.id)) throw new ConfigError(`--model: model id "${m.id}" given twice`);
        ids.add(m.id);
      }
      return models;
    },
    fallback: () => [],
  }),
  option({ flag: "host", env: "SPINDLE_HOST", arg: "ADDR", field: "host", defaultText: "`127.0.0.1`", help: "address to bind", read: last, fallback: () => "127.0.0.1" }),
  option({
    flag: "port", env: "SPINDLE_PORT", arg: "N", field: "port", defaultText: "`8080`",
    help: "port; `0` picks a free one (the `listening on` line tells which)",
    read: (r) => integer("port", last(r), 0, 65535), fallback: () => 8080,
  }),
  option({
    flag: "threads", env: "SPINDLE_THREADS", arg: "N", field: "threads", defaultText: "cores − 1, at least 1",
    help: "compute threads per model",
    read: (r) => integer("threads", last(r), 1, 1024), fallback: defaultThreads,
  }),
  option({
    flag: "gpu", env: "SPINDLE_GPU", arg: GPU_CHOICES.join("|"), field: "gpu", defaultText: "`auto`",
    help: "compute backend",
    read: (r) => choice("gpu", last(r), GPU_CHOICES), fallback: () => "auto" as const,
  }),
  option({
    flag: "engine-build", env: "SPINDLE_ENGINE_BUILD", arg: ENGINE_BINARIES.join("|"), field: "engineBuild", defaultText: "`auto`",
    help: "llama.cpp binary: `local` is one compiled for this CPU by `npm run engine:build` (faster here: README, \"Engine builds\"), `prebuilt` node-llama-cpp's own, `auto` local when there is one",
    read: (r) => choice("engine-build", last(r), ENGINE_BINARIES), fallback: () => "auto" as const,
  }),
  option({
    flag: "step-thread", env: "SPINDLE_STEP_THREAD", arg: STEP_THREADS.join("|"), field: "stepThread", defaultText: "`auto`",
    help: "where a decode step and its sampling run: `auto` runs a step of one sequence and a few tokens on a steady thread beside the JavaScript thread, which samples it and writes the last token meanwhile (where every request in a step is greedy, the step is sampled there too and the next one run ahead, for one sequence or several), where the llama.cpp binary can (a local build: `npm run engine:build`), and every other step in libuv jobs; `steady` the same without running steps ahead; `js` runs such a step on the JavaScript thread itself; `pool` runs every step in libuv jobs, node-llama-cpp's way (README, \"Engine builds\")",
    read: (r) => choice("step-thread", last(r), STEP_THREADS), fallback: () => "auto" as const,
  }),
  option({
    flag: "parallel", env: "SPINDLE_PARALLEL", arg: "N", field: "parallel", defaultText: "4 (or the models file)",
    help: "concurrent sequences (slots) per model",
    read: (r) => integer("parallel", last(r), 1, 256), fallback: () => undefined,
  }),
  option({
    flag: "ctx-size", env: "SPINDLE_CTX_SIZE", arg: "N", field: "ctxSize", defaultText: "2048, capped at the model's trained size (or the models file)",
    help: "context tokens **per sequence**",
    read: (r) => integer("ctx-size", last(r), 16, 1 << 20), fallback: () => undefined,
  }),
  option({
    flag: "chat-template", env: "SPINDLE_CHAT_TEMPLATE", arg: "NAME|FILE", field: "chatTemplate", defaultText: "the GGUF's own (or the models file's)",
    help: "chat template for every model: a built-in wrapper name (`general`, `chatML`, `llama3.1`, …) or a Jinja file",
    read: last, fallback: () => undefined,
  }),
  option({
    flag: "flash-attention", env: "SPINDLE_FLASH_ATTENTION", arg: "auto|on|off", field: "flashAttention", defaultText: "`auto`",
    help: "`auto`: on for GPU backends and for a CPU local build (`npm run engine:build`) when attention heads are at least 32 wide; off with the prebuilt CPU binary, whose kernels for it are scalar here (`npm run bench -- micro flash-attention`)",
    read: (r) => choice("flash-attention", last(r), ["auto", "on", "off"] as const), fallback: () => "auto" as const,
  }),
  option({
    flag: "speculative", env: "SPINDLE_SPECULATIVE", arg: "ngram[:N]|draft[:N]", field: "speculative", defaultText: "off (`draft` with `--model-draft`)",
    help: "speculative decoding for every model. `ngram`: prompt lookup, up to N tokens (default 3) that followed the last ones in the prompt are evaluated ahead and kept when the model agrees; pays when outputs repeat their input (edits, summaries, code). `draft`: the `--model-draft` model guesses up to N tokens (default 8) ahead of a slot, while no more than `--speculative-disable-by-batch-size` generations run",
    read: (r) => {
      const m = /^(ngram|draft)(?::(\d+))?$/.exec(last(r));
      const method = m?.[1] as "ngram" | "draft" | undefined;
      const tokens = m?.[2] !== undefined ? Number(m[2]) : method === "draft" ? DEFAULT_DRAFT_TOKENS : 3;
      if (!method || tokens < 1 || tokens > 64) throw new ConfigError(`--speculative: expected ngram[:N] or draft[:N] (N from 1 to 64), got "${last(r)}"`);
      if (method === "ngram" && tokens > 16) throw new ConfigError(`--speculative: ngram:N takes N from 1 to 16, got ${tokens}`);
      // The draft's file comes from --model-draft (resolveSpeculation).
      return method === "ngram" ? { method, tokens, minPattern: 1 } : { method, tokens, path: "", minConfidence: DEFAULT_DRAFT_MIN_CONFIDENCE };
    },
    fallback: () => undefined,
  }),
  option({
    flag: "model-draft", env: "SPINDLE_MODEL_DRAFT", arg: "FILE", field: "modelDraft", defaultText: "–",
    help: "a draft model for speculative decoding on every model (llama-server's name): a smaller GGUF with the same tokenizer, loaded beside each version and counted in its memory; implies `--speculative draft`",
    read: (r) => resolve(last(r)), fallback: () => undefined,
  }),
  option({
    flag: "draft-p-min", env: "SPINDLE_DRAFT_P_MIN", arg: "P", field: "draftMinConfidence", defaultText: String(DEFAULT_DRAFT_MIN_CONFIDENCE),
    help: "the draft model stops guessing at a token it gives less than this probability (0 to 1; 0: it always guesses N)",
    read: (r) => fraction("draft-p-min", last(r), "a probability"),
    fallback: () => DEFAULT_DRAFT_MIN_CONFIDENCE,
  }),
  option({
    flag: "speculative-disable-by-batch-size", env: "SPINDLE_SPECULATIVE_DISABLE_BY_BATCH_SIZE", arg: "N", field: "speculativeDisableByBatchSize", defaultText: "`draft`: 1; `ngram`: none",
    help: "no guesses while more than N generations run on a version (vLLM's `disable_by_batch_size`): a slot waiting on its draft drops out of the step that batches the others",
    read: (r) => integer("speculative-disable-by-batch-size", last(r), 1, 256), fallback: () => undefined,
  }),
  option({
    flag: "slots", env: "SPINDLE_SLOTS", arg: "NxCTX,…", field: "slots", defaultText: "–",
    help: "slot classes for every model instead of one `--parallel` × `--ctx-size`: `8x512,1x4096` is 8 slots of 512 tokens and 1 of 4,096, each class a context of its own; a request takes the smallest class it fits",
    read: (r) => parseSlots(last(r)), fallback: () => undefined,
  }),
  option({
    flag: "cache-type-k", env: "SPINDLE_CACHE_TYPE_K", arg: "TYPE", field: "cacheTypeK", defaultText: "`f16`",
    help: "KV cache keys' type for every model: `f16`, `q8_0` (half the memory), `q4_0`, … as llama-server names them; the memory estimate and KV metrics follow it",
    read: (r) => choice("cache-type-k", last(r), KV_CACHE_TYPES), fallback: () => undefined,
  }),
  option({
    flag: "cache-type-v", env: "SPINDLE_CACHE_TYPE_V", arg: "TYPE", field: "cacheTypeV", defaultText: "`f16`",
    help: "KV cache values' type; a quantized one turns flash attention on (llama.cpp needs it)",
    read: (r) => choice("cache-type-v", last(r), KV_CACHE_TYPES), fallback: () => undefined,
  }),
  option({
    flag: "no-mmap", env: "SPINDLE_NO_MMAP", arg: "", field: "noMmap", defaultText: "off (mapped)", boolean: true,
    help: "read every model's weights into memory instead of mapping the file (llama-server's name; the models file's `mmap: false` per version): slower to load, but weights never fault back in from disk where the OS drops cached file pages",
    read: (r) => onOff("SPINDLE_NO_MMAP", last(r)),
    fallback: () => false,
  }),
  option({
    flag: "max-queue", env: "SPINDLE_MAX_QUEUE", arg: "N", field: "maxQueue", defaultText: "64",
    help: "requests that may wait for a slot, per model; beyond it 429",
    read: (r) => integer("max-queue", last(r), 0, 1_000_000), fallback: () => 64,
  }),
  option({
    flag: "max-queued-tokens", env: "SPINDLE_MAX_QUEUED_TOKENS", arg: "N", field: "maxQueuedTokens", defaultText: "65536",
    help: "prompt tokens that may wait, per model; beyond it 429",
    read: (r) => integer("max-queued-tokens", last(r), 1, 2 ** 30), fallback: () => 65536,
  }),
  option({
    flag: "scheduler-delay-factor", env: "SPINDLE_SCHEDULER_DELAY_FACTOR", arg: "F", field: "schedulerDelayFactor", defaultText: String(DEFAULT_SCHEDULER_DELAY_FACTOR),
    help: "a request that finds its model idle, where requests have been arriving in bursts, waits F × a recent decode step (at most 5 ms; none under 0.25 ms) for the others arriving with it, so they share their first step (vLLM's name); and where clients send their next request soon after their stream ends (within a quarter of a step, as benchmarks and agents do), the step after a stream ends waits for them (at most half a step) (0: neither; README, \"Measured\", W3)",
    read: (r) => fraction("scheduler-delay-factor", last(r), "a number"),
    fallback: () => DEFAULT_SCHEDULER_DELAY_FACTOR,
  }),
  option({
    flag: "request-timeout", env: "SPINDLE_REQUEST_TIMEOUT", arg: "S", field: "requestTimeoutSeconds", defaultText: "600",
    help: "default deadline in seconds, queue included",
    read: (r) => seconds("request-timeout", last(r)), fallback: () => 600,
  }),
  option({
    flag: "max-body-bytes", env: "SPINDLE_MAX_BODY_BYTES", arg: "N", field: "maxBodyBytes", defaultText: "4194304",
    help: "largest request body; beyond it 413",
    read: (r) => integer("max-body-bytes", last(r), 1024, 2 ** 30), fallback: () => 4 * 1024 * 1024,
  }),
  option({
    flag: "metrics", env: "SPINDLE_METRICS", arg: "on|off", field: "metrics", defaultText: "`on`",
    help: "Prometheus metrics at `/metrics`",
    read: (r) => choice("metrics", last(r), ["on", "off"] as const) === "on", fallback: () => true,
  }),
  option({
    flag: "otlp-endpoint", env: "SPINDLE_OTLP_ENDPOINT", arg: "URL", field: "otlpEndpoint", defaultText: "off",
    help: "send OpenTelemetry traces over OTLP/HTTP (`/v1/traces` is appended to a base URL; also `OTEL_EXPORTER_OTLP_ENDPOINT`)",
    read: last, fallback: () => undefined,
  }),
  option({
    flag: "api-key", env: "SPINDLE_API_KEYS", arg: "KEY", field: "apiKeys", defaultText: "none", multiple: true,
    help: "require a key (`Authorization: Bearer KEY` or `X-Api-Key: KEY`); repeatable",
    read: (r) => keys("api-key", r), fallback: () => [],
  }),
  option({
    flag: "admin-key", env: "SPINDLE_ADMIN_KEYS", arg: "KEY", field: "adminKeys", defaultText: "none (loopback only)", multiple: true,
    help: "key for the `/admin` routes; without one they answer loopback clients only; repeatable",
    read: (r) => keys("admin-key", r), fallback: () => [],
  }),
  option({
    flag: "api-keys-file", env: "SPINDLE_API_KEYS_FILE", arg: "FILE", field: "apiKeysFile", defaultText: "–",
    help: "more keys, one per line (`#` comments)",
    read: last, fallback: () => undefined,
  }),
  option({
    flag: "public", env: "SPINDLE_PUBLIC", arg: "LIST", field: "publicAreas", defaultText: "`health,page`",
    help: "what stays open when keys are required: `health` (`/livez`, `/readyz`, `/health`), `metrics`, `page` (`/`)",
    read: (r) =>
      last(r)
        .split(",")
        .map((s) => s.trim())
        .filter((s) => s !== "")
        .map((a) => {
          if (!PUBLIC_AREAS.includes(a as PublicArea)) throw new ConfigError(`--public: unknown area "${a}" (health, metrics, page)`);
          return a as PublicArea;
        }),
    fallback: () => ["health", "page"],
  }),
  option({
    flag: "cors-origin", env: "SPINDLE_CORS_ORIGINS", arg: "ORIGIN", field: "corsOrigins", defaultText: "none (CORS off)", multiple: true,
    help: "allowed browser origin (`*` for any); repeatable",
    read: (r) => {
      for (const o of r) if (o !== "*" && !/^https?:\/\/[^/]+$/.test(o)) throw new ConfigError(`--cors-origin: expected an origin like https://app.example.com, got "${o}"`);
      return r;
    },
    fallback: () => [],
  }),
  option({
    flag: "key-max-concurrent", env: "SPINDLE_KEY_MAX_CONCURRENT", arg: "N", field: "keyMaxConcurrent", defaultText: "0 (off)",
    help: "requests in flight per key",
    read: (r) => integer("key-max-concurrent", last(r), 0, 1_000_000), fallback: () => 0,
  }),
  option({
    flag: "key-tokens-per-minute", env: "SPINDLE_KEY_TOKENS_PER_MINUTE", arg: "N", field: "keyTokensPerMinute", defaultText: "0 (off)",
    help: "prompt + completion tokens per key per minute",
    read: (r) => integer("key-tokens-per-minute", last(r), 0, Number.MAX_SAFE_INTEGER), fallback: () => 0,
  }),
  option({
    flag: "read-timeout", env: "SPINDLE_READ_TIMEOUT", arg: "S", field: "readTimeoutSeconds", defaultText: "30",
    help: "time a client has to send its whole request; then 408",
    read: (r) => integer("read-timeout", last(r), 1, 3600), fallback: () => 30,
  }),
  option({
    flag: "shutdown-grace", env: "SPINDLE_SHUTDOWN_GRACE", arg: "S", field: "shutdownGraceSeconds", defaultText: "30",
    help: "on SIGTERM/SIGINT, how long running generations may finish",
    read: (r) => integer("shutdown-grace", last(r), 0, 3600), fallback: () => 30,
  }),
  option({
    flag: "memory-budget", env: "SPINDLE_MEMORY_BUDGET", arg: "SIZE", field: "memoryBudget", defaultText: "70% of RAM",
    help: "RAM that loaded model versions may take (`800000000`, `512MiB`, `4GiB`, `1.5GB`); estimated before each load",
    read: (r) => parseSize("memory-budget", last(r)), fallback: () => undefined,
  }),
  option({
    flag: "vram-budget", env: "SPINDLE_VRAM_BUDGET", arg: "SIZE", field: "vramBudget", defaultText: "90% of the device",
    help: "VRAM, on GPU backends",
    read: (r) => parseSize("vram-budget", last(r)), fallback: () => undefined,
  }),
  option({
    flag: "max-loaded-models", env: "SPINDLE_MAX_LOADED_MODELS", arg: "N", field: "maxLoadedModels", defaultText: "0 (no cap)",
    help: "most versions in memory at once",
    read: (r) => integer("max-loaded-models", last(r), 0, 10_000), fallback: () => 0,
  }),
  option({
    flag: "embeddings", env: "SPINDLE_EMBEDDINGS", arg: "", field: "embeddings", defaultText: "off", boolean: true,
    help: "the `--model` files serve `/v1/embeddings` as well as generation (each gets an embedding context, counted in the memory budget)",
    read: (r) => onOff("SPINDLE_EMBEDDINGS", last(r)),
    fallback: () => false,
  }),
  option({
    flag: "responses-store-size", env: "SPINDLE_RESPONSES_STORE_SIZE", arg: "N", field: "responsesStoreSize", defaultText: "1000",
    help: "stored responses (`store: true`) kept for `previous_response_id` and `GET /v1/responses/{id}`; the oldest go first; 0 stores none",
    read: (r) => integer("responses-store-size", last(r), 0, 1_000_000), fallback: () => 1000,
  }),
  option({
    flag: "responses-store-ttl", env: "SPINDLE_RESPONSES_STORE_TTL", arg: "S", field: "responsesStoreTtlSeconds", defaultText: "3600",
    help: "seconds a stored response is kept",
    read: (r) => seconds("responses-store-ttl", last(r)), fallback: () => 3600,
  }),
  option({
    flag: "responses-store-memory", env: "SPINDLE_RESPONSES_STORE_MEMORY", arg: "SIZE", field: "responsesStoreBytes", defaultText: "256MiB",
    help: "memory the stored responses may take (each holds its whole conversation); the oldest go first",
    read: (r) => parseSize("responses-store-memory", last(r)), fallback: () => 256 * 1024 * 1024,
  }),
  option({
    flag: "load-on-demand", env: "SPINDLE_LOAD_ON_DEMAND", arg: LOAD_POLICIES.join("|"), field: "loadOnDemand", defaultText: "`ids`",
    help: "which requests may load a version that is not in memory: `any` name; `ids` (model ids and aliases, and the canary they route to; an exact `id@version` must already be loaded); `admin` (none: only start-up and `POST /admin/…/load`)",
    read: (r) => choice("load-on-demand", last(r), LOAD_POLICIES), fallback: () => "ids" as const,
  }),
  option({
    flag: "ws-max-connections", env: "SPINDLE_WS_MAX_CONNECTIONS", arg: "N", field: "wsMaxConnections", defaultText: "1024",
    help: "open WebSocket connections; beyond it the upgrade gets 503",
    read: (r) => integer("ws-max-connections", last(r), 1, 1_000_000), fallback: () => 1024,
  }),
  option({
    flag: "ws-max-connections-per-client", env: "SPINDLE_WS_MAX_CONNECTIONS_PER_CLIENT", arg: "N", field: "wsMaxConnectionsPerClient", defaultText: "32",
    help: "open WebSocket connections per client address; beyond it the upgrade gets 429",
    read: (r) => integer("ws-max-connections-per-client", last(r), 1, 1_000_000), fallback: () => 32,
  }),
  option({
    flag: "state-file", env: "SPINDLE_STATE_FILE", arg: "FILE", field: "stateFile", defaultText: "`<models file>.state.json`",
    help: "where promotions, rollbacks, canary/shadow weights and first-served hashes are kept",
    read: last, fallback: () => undefined,
  }),
  option({
    flag: "log-level", env: "SPINDLE_LOG_LEVEL", arg: "LEVEL", field: "logLevel", defaultText: "`info`",
    help: "`fatal` … `trace`, or `silent`",
    read: (r) => choice("log-level", last(r), LOG_LEVELS), fallback: () => "info" as const,
  }),
] as const;

export type OptionDeclaration = (typeof OPTIONS)[number];

/**
 * The speculation flags as one setting: --model-draft names the draft (and alone means
 * `--speculative draft`), --draft-p-min tunes it; a draft method without a draft file, or
 * a draft file with prompt lookup, is a mistake said in one line.
 */
export function resolveSpeculation(o: Pick<ServerOptions, "speculative" | "modelDraft" | "draftMinConfidence">): SpeculativeOptions | undefined {
  const s = o.speculative;
  if (o.modelDraft === undefined) {
    if (s?.method === "draft") throw new ConfigError("--speculative draft: name the draft model with --model-draft FILE");
    return s;
  }
  if (s?.method === "ngram") throw new ConfigError("--model-draft: goes with --speculative draft[:N], not ngram");
  return { method: "draft", tokens: s?.tokens ?? DEFAULT_DRAFT_TOKENS, path: o.modelDraft, minConfidence: o.draftMinConfidence };
}

/** Every option at its default: what a server started with no flags and no environment runs with. */
export function defaultServerOptions(): ServerOptions {
  const out: Record<string, unknown> = { configExplicit: false };
  for (const o of OPTIONS) out[o.field] = o.fallback();
  return out as unknown as ServerOptions;
}

/** The README's option table, as this declaration writes it. */
export function optionsTable(): string {
  const rows = ["| option | environment | default | meaning |", "|---|---|---|---|"];
  for (const o of OPTIONS) {
    const env = `\`${o.env}\`${o.multiple ? " (comma-separated)" : ""}`;
    rows.push(`| \`--${o.flag}${o.arg ? ` ${o.arg.replaceAll("|", "\\|")}` : ""}\` | ${env} | ${o.defaultText} | ${o.help} |`);
  }
  return rows.join("\n");
}
