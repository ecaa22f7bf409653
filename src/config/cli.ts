import { parseArgs } from "node:util";
import { readFileSync } from "node:fs";
import { availableParallelism } from "node:os";
import { parseSize } from "./sizes.js";

/** A problem with how the server was started: printed as one line, exit code 2. */
export class ConfigError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "ConfigError";
  }
}

export type PublicArea = "health" | "metrics" | "page";
const PUBLIC_AREAS: readonly PublicArea[] = ["health", "metrics", "page"];

export type GpuChoice = "auto" | "cuda" | "metal" | "vulkan" | "cpu";
const GPU_CHOICES: readonly GpuChoice[] = ["auto", "cuda", "metal", "vulkan", "cpu"];

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
  parallel: number | undefined;
  ctxSize: number | undefined;
  flashAttention: "auto" | "on" | "off";
  maxQueue: number;
  maxQueuedTokens: number;
  requestTimeoutSeconds: number;
  maxBodyBytes: number;
  otlpEndpoint: string | undefined;
  metrics: boolean;
  apiKeys: string[];
  adminKeys: string[];
  publicAreas: PublicArea[];
  corsOrigins: string[];
  keyMaxConcurrent: number;
  keyTokensPerMinute: number;
  shutdownGraceSeconds: number;
  readTimeoutSeconds: number;
  logLevel: string;
  /** Bytes of RAM resident model versions may take (estimated before loading); default: 70% of the machine's. */
  memoryBudget: number | undefined;
  /** Bytes of VRAM, on GPU backends; default: 90% of the device's. */
  vramBudget: number | undefined;
  /** Most model versions in memory at once; 0: no limit but the budget. */
  maxLoadedModels: number;
  /** Where promotions, rollbacks and canary weights are kept; default: beside the models file. */
  stateFile: string | undefined;
}

/**
 * One compute thread per spare core: the JavaScript thread that drives the batch
 * loop needs a core of its own. On a 2-core machine that means 1 thread, which the
 * engine notes measured at ~25x the speed of the library default (4) for small models.
 */
export function defaultThreads(): number {
  return Math.max(1, availableParallelism() - 1);
}

interface OptionSpec {
  env: string;
  arg: string;
  help: string;
  /** Repeatable on the command line; comma-separated in the environment variable. */
  multiple?: boolean;
}

// Every option, its environment variable and its help line, in one table so --help,
// the README and the parser cannot drift apart.
const OPTIONS: Record<string, OptionSpec> = {
  config: { env: "SPINDLE_CONFIG", arg: "FILE", help: "models file (default: models.yaml in the working directory)" },
  model: { env: "SPINDLE_MODEL", arg: "PATH[=ID]", help: "serve this GGUF file without a models file; repeatable (env: comma-separated)", multiple: true },
  host: { env: "SPINDLE_HOST", arg: "ADDR", help: "address to bind (default 127.0.0.1)" },
  port: { env: "SPINDLE_PORT", arg: "N", help: "port to listen on (default 8080; 0 picks a free port)" },
  threads: { env: "SPINDLE_THREADS", arg: "N", help: "compute threads per model (default: cores - 1, at least 1)" },
  gpu: { env: "SPINDLE_GPU", arg: "auto|cuda|metal|vulkan|cpu", help: "compute backend (default auto)" },
  parallel: { env: "SPINDLE_PARALLEL", arg: "N", help: "concurrent sequences (slots) per model (default 4, or the models file's value)" },
  "ctx-size": { env: "SPINDLE_CTX_SIZE", arg: "N", help: "context tokens per sequence (default 2048 capped at the model's trained size)" },
  "flash-attention": { env: "SPINDLE_FLASH_ATTENTION", arg: "auto|on|off", help: "flash attention (default auto: on for GPU backends, off on CPU)" },
  "max-queue": { env: "SPINDLE_MAX_QUEUE", arg: "N", help: "requests that may wait for a slot per model; beyond it 429 (default 64)" },
  "max-queued-tokens": { env: "SPINDLE_MAX_QUEUED_TOKENS", arg: "N", help: "prompt tokens that may wait per model; beyond it 429 (default 65536)" },
  "request-timeout": { env: "SPINDLE_REQUEST_TIMEOUT", arg: "SECONDS", help: "deadline for a request, queue included (default 600)" },
  "max-body-bytes": { env: "SPINDLE_MAX_BODY_BYTES", arg: "N", help: "largest accepted request body (default 4194304)" },
  metrics: { env: "SPINDLE_METRICS", arg: "on|off", help: "Prometheus metrics at /metrics (default on)" },
  "otlp-endpoint": { env: "SPINDLE_OTLP_ENDPOINT", arg: "URL", help: "send OpenTelemetry traces over OTLP/HTTP (also: OTEL_EXPORTER_OTLP_ENDPOINT)" },
  "api-key": { env: "SPINDLE_API_KEYS", arg: "KEY", help: "require this API key (Bearer or X-Api-Key); repeatable (env: comma-separated)", multiple: true },
  "admin-key": { env: "SPINDLE_ADMIN_KEYS", arg: "KEY", help: "key for the /admin routes (without one they answer loopback clients only); repeatable", multiple: true },
  "api-keys-file": { env: "SPINDLE_API_KEYS_FILE", arg: "FILE", help: "API keys, one per line ('#' comments)" },
  public: { env: "SPINDLE_PUBLIC", arg: "LIST", help: "what stays open when keys are required: health, metrics, page (default health,page)" },
  "cors-origin": { env: "SPINDLE_CORS_ORIGINS", arg: "ORIGIN", help: "allow browser requests from this origin; repeatable (default: CORS off)", multiple: true },
  "key-max-concurrent": { env: "SPINDLE_KEY_MAX_CONCURRENT", arg: "N", help: "requests in flight per API key; beyond it 429 (default 0: no limit)" },
  "key-tokens-per-minute": { env: "SPINDLE_KEY_TOKENS_PER_MINUTE", arg: "N", help: "prompt + completion tokens per API key per minute (default 0: no limit)" },
  "read-timeout": { env: "SPINDLE_READ_TIMEOUT", arg: "SECONDS", help: "time a client has to send its whole request; 408 after (default 30)" },
  "shutdown-grace": { env: "SPINDLE_SHUTDOWN_GRACE", arg: "SECONDS", help: "on SIGTERM/SIGINT, how long running generations may finish (default 30)" },
  "memory-budget": { env: "SPINDLE_MEMORY_BUDGET", arg: "SIZE", help: "RAM that loaded models may take, e.g. 512MiB or 4GiB (default 70% of the machine's)" },
  "vram-budget": { env: "SPINDLE_VRAM_BUDGET", arg: "SIZE", help: "VRAM that loaded models may take on a GPU backend (default 90% of the device's)" },
  "max-loaded-models": { env: "SPINDLE_MAX_LOADED_MODELS", arg: "N", help: "most model versions in memory at once (default 0: only the budget limits)" },
  "state-file": { env: "SPINDLE_STATE_FILE", arg: "FILE", help: "promotions and canary weights survive restarts here (default: <models file>.state.json)" },
  "log-level": { env: "SPINDLE_LOG_LEVEL", arg: "LEVEL", help: "fatal|error|warn|info|debug|trace|silent (default info)" },
};

export function helpText(): string {
  const lines = [
    "Usage: npm start -- [options]",
    "",
    "Spindle: an OpenAI-compatible LLM server over llama.cpp.",
    "",
    "Options (each also settable by the environment variable shown):",
  ];
  for (const [name, spec] of Object.entries(OPTIONS)) {
    const flag = `  --${name} ${spec.arg}`;
    lines.push(`${flag.padEnd(44)}${spec.help} [${spec.env}]`);
  }
  lines.push(`${"  --help".padEnd(44)}print this help`);
  return lines.join("\n");
}

function parseInteger(name: string, raw: string, min: number, max: number): number {
  if (!/^\d+$/.test(raw.trim())) throw new ConfigError(`--${name}: expected an integer, got "${raw}"`);
  const n = Number(raw);
  if (n < min || n > max) throw new ConfigError(`--${name}: must be between ${min} and ${max}, got ${n}`);
  return n;
}

function parsePositiveNumber(name: string, raw: string): number {
  const n = Number(raw);
  if (raw.trim() === "" || !Number.isFinite(n) || n <= 0) throw new ConfigError(`--${name}: expected a positive number, got "${raw}"`);
  return n;
}

export function parseModelArg(raw: string): CliModel {
  const eq = raw.lastIndexOf("=");
  const path = eq > 0 ? raw.slice(0, eq) : raw;
  const explicitId = eq > 0 ? raw.slice(eq + 1) : "";
  if (path === "") throw new ConfigError(`--model: empty path in "${raw}"`);
  const base = path.split(/[\\/]/).pop() ?? path;
  const id = explicitId !== "" ? explicitId : base.replace(/\.gguf$/i, "");
  if (!/^[A-Za-z0-9][A-Za-z0-9._:\-]*$/.test(id)) {
    throw new ConfigError(`--model: invalid model id "${id}" (letters, digits, '.', '_', ':' and '-')`);
  }
  return { path, id };
}

export type ParseResult = { kind: "help" } | { kind: "run"; options: ServerOptions };

export function parseCommandLine(argv: string[], env: NodeJS.ProcessEnv = process.env): ParseResult {
  const optionDefs: Record<string, { type: "string" | "boolean"; multiple?: boolean }> = { help: { type: "boolean" } };
  for (const [name, spec] of Object.entries(OPTIONS)) optionDefs[name] = { type: "string", multiple: spec.multiple === true };

  let values: Record<string, string | boolean | (string | boolean)[] | undefined>;
  try {
    ({ values } = parseArgs({ args: argv, options: optionDefs, strict: true, allowPositionals: false }));
  } catch (err) {
    // node's messages are one line and name the option; drop its internal code prefix.
    throw new ConfigError((err as Error).message.replace(/^TypeError \[[A-Z_]+\]: /, ""));
  }
  if (values.help === true) return { kind: "help" };

  const get = (name: string): string | undefined => {
    const v = values[name];
    if (typeof v === "string") return v;
    const fromEnv = env[OPTIONS[name]!.env];
    return fromEnv !== undefined && fromEnv !== "" ? fromEnv : undefined;
  };

  const list = (name: string): string[] => (values[name] as string[] | undefined) ?? env[OPTIONS[name]!.env]?.split(",").map((s) => s.trim()).filter((s) => s !== "") ?? [];
  const modelArgs = list("model");
  const models = modelArgs.map(parseModelArg);
  const ids = new Set<string>();
  for (const m of models) {
    if (ids.has(m.id)) throw new ConfigError(`--model: model id "${m.id}" given twice`);
    ids.add(m.id);
  }

  const gpuRaw = get("gpu") ?? "auto";
  if (!GPU_CHOICES.includes(gpuRaw as GpuChoice)) {
    throw new ConfigError(`--gpu: expected one of ${GPU_CHOICES.join("|")}, got "${gpuRaw}"`);
  }
  const flash = get("flash-attention") ?? "auto";
  if (flash !== "auto" && flash !== "on" && flash !== "off") throw new ConfigError(`--flash-attention: expected auto|on|off, got "${flash}"`);
  const metrics = get("metrics") ?? "on";
  if (metrics !== "on" && metrics !== "off") throw new ConfigError(`--metrics: expected on|off, got "${metrics}"`);
  const apiKeys = list("api-key");
  const keysFile = get("api-keys-file");
  if (keysFile !== undefined) {
    let text: string;
    try {
      text = readFileSync(keysFile, "utf8");
    } catch (err) {
      throw new ConfigError(`--api-keys-file: cannot read ${keysFile}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
    }
    for (const line of text.split("\n")) {
      const key = line.replace(/#.*/, "").trim();
      if (key !== "") apiKeys.push(key);
    }
  }
  for (const k of apiKeys) if (k.length < 8) throw new ConfigError("--api-key: keys must be at least 8 characters");
  const adminKeys = list("admin-key");
  for (const k of adminKeys) if (k.length < 8) throw new ConfigError("--admin-key: keys must be at least 8 characters");
  const publicAreas = (get("public") ?? "health,page").split(",").map((s) => s.trim()).filter((s) => s !== "");
  for (const a of publicAreas) if (!PUBLIC_AREAS.includes(a as PublicArea)) throw new ConfigError(`--public: unknown area "${a}" (health, metrics, page)`);
  const corsOrigins = list("cors-origin");
  for (const o of corsOrigins) if (o !== "*" && !/^https?:\/\/[^/]+$/.test(o)) throw new ConfigError(`--cors-origin: expected an origin like https://app.example.com, got "${o}"`);
  const keyConc = get("key-max-concurrent");
  const keyTpm = get("key-tokens-per-minute");
  const grace = get("shutdown-grace");
  const readTimeout = get("read-timeout");
  const logLevel = get("log-level") ?? "info";
  if (!["fatal", "error", "warn", "info", "debug", "trace", "silent"].includes(logLevel)) {
    throw new ConfigError(`--log-level: unknown level "${logLevel}"`);
  }
  const port = get("port");
  const threads = get("threads");
  const parallel = get("parallel");
  const ctxSize = get("ctx-size");
  const maxQueue = get("max-queue");
  const maxQueuedTokens = get("max-queued-tokens");
  const timeout = get("request-timeout");
  const maxBody = get("max-body-bytes");
  const config = get("config");
  const memoryBudget = get("memory-budget");
  const vramBudget = get("vram-budget");
  const maxLoaded = get("max-loaded-models");
  const stateFile = get("state-file");

  return {
    kind: "run",
    options: {
      configFile: config ?? "models.yaml",
      configExplicit: config !== undefined,
      models,
      host: get("host") ?? "127.0.0.1",
      port: port === undefined ? 8080 : parseInteger("port", port, 0, 65535),
      threads: threads === undefined ? defaultThreads() : parseInteger("threads", threads, 1, 1024),
      gpu: gpuRaw as GpuChoice,
      parallel: parallel === undefined ? undefined : parseInteger("parallel", parallel, 1, 256),
      ctxSize: ctxSize === undefined ? undefined : parseInteger("ctx-size", ctxSize, 16, 1 << 20),
      flashAttention: flash,
      maxQueue: maxQueue === undefined ? 64 : parseInteger("max-queue", maxQueue, 0, 1_000_000),
      maxQueuedTokens: maxQueuedTokens === undefined ? 65536 : parseInteger("max-queued-tokens", maxQueuedTokens, 1, 1 << 30),
      requestTimeoutSeconds: timeout === undefined ? 600 : parsePositiveNumber("request-timeout", timeout),
      maxBodyBytes: maxBody === undefined ? 4 * 1024 * 1024 : parseInteger("max-body-bytes", maxBody, 1024, 1 << 30),
      otlpEndpoint: get("otlp-endpoint"),
      metrics: metrics === "on",
      apiKeys,
      adminKeys,
      publicAreas: publicAreas as PublicArea[],
      corsOrigins,
      keyMaxConcurrent: keyConc === undefined ? 0 : parseInteger("key-max-concurrent", keyConc, 0, 1_000_000),
      keyTokensPerMinute: keyTpm === undefined ? 0 : parseInteger("key-tokens-per-minute", keyTpm, 0, 1 << 40),
      shutdownGraceSeconds: grace === undefined ? 30 : parseInteger("shutdown-grace", grace, 0, 3600),
      readTimeoutSeconds: readTimeout === undefined ? 30 : parseInteger("read-timeout", readTimeout, 1, 3600),
      logLevel,
      memoryBudget: memoryBudget === undefined ? undefined : parseSize("memory-budget", memoryBudget),
      vramBudget: vramBudget === undefined ? undefined : parseSize("vram-budget", vramBudget),
      maxLoadedModels: maxLoaded === undefined ? 0 : parseInteger("max-loaded-models", maxLoaded, 0, 10_000),
      stateFile,
    },
  };
}
