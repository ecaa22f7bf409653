/** The process: reads the configuration, starts the server, prints where it listens, and stops on signals. */
import { existsSync, readdirSync, statSync } from "node:fs";
import { join, resolve } from "node:path";
import { helpText, parseCommandLine } from "./config/cli.js";
import { loadModelsFile, repositoryFromSpecs, versionName, type RepositoryConfig } from "./config/models-file.js";
import type { ServerOptions } from "./config/options.js";
import { BackendUnavailableError, ModelLoadError } from "./engine/types.js";
import { ConfigError } from "./errors.js";
import type { RunningServer } from "./server.js";

function isLoopback(host: string): boolean {
  return host === "localhost" || host === "::1" || host.startsWith("127.");
}

function fail(message: string): never {
  process.stderr.write(`spindle: ${message}\n`);
  process.exit(2);
}

/**
 * A --model path as a file: a directory stands for the one .gguf file in it (as KServe's
 * storage initializer leaves a model in /mnt/models under the name it had).
 */
function modelFile(path: string): string {
  const abs = resolve(path);
  if (!existsSync(abs) || !statSync(abs).isDirectory()) return abs;
  const ggufs = readdirSync(abs).filter((f) => f.toLowerCase().endsWith(".gguf"));
  if (ggufs.length !== 1) {
    throw new ConfigError(`--model ${path}: a directory must hold exactly one .gguf file; it holds ${ggufs.length === 0 ? "none" : ggufs.join(", ")}`);
  }
  return join(abs, ggufs[0]!);
}

function repositoryConfig(options: ServerOptions): RepositoryConfig {
  if (options.models.length > 0) {
    return repositoryFromSpecs(
      options.models.map((m) => ({
        id: m.id,
        version: versionName(undefined, undefined),
        path: modelFile(m.path),
        sha256: undefined,
        sources: [],
        chatTemplate: undefined,
        ctxSize: undefined,
        parallel: undefined,
        sampling: {},
        embeddings: options.embeddings ? { dimensions: [] } : undefined,
      })),
    );
  }
  if (!options.configExplicit && !existsSync(options.configFile)) {
    throw new ConfigError(`no models to serve: ${options.configFile} not found (pass --config FILE or --model PATH)`);
  }
  return loadModelsFile(options.configFile);
}

async function main(): Promise<void> {
  let options: ServerOptions;
  let repository: RepositoryConfig;
  try {
    const parsed = parseCommandLine(process.argv.slice(2));
    if (parsed.kind === "help") {
      process.stdout.write(`${helpText()}\n`);
      return;
    }
    options = parsed.options;
    repository = repositoryConfig(options);
    for (const m of repository.models) {
      for (const v of m.versions) {
        if (v.sources.length === 0 && !existsSync(v.path)) throw new ConfigError(`model "${v.id}@${v.version}": file not found: ${v.path}`);
      }
    }
    // Operators' changes (promotions, canary weights) are kept beside the models file.
    if (options.stateFile === undefined && options.models.length === 0) options.stateFile = options.configFile.replace(/\.ya?ml$/i, "") + ".state.json";
  } catch (err) {
    if (err instanceof ConfigError) fail(err.message);
    throw err;
  }

  let server: RunningServer;
  try {
    // Loaded only now: `--help` and configuration errors answer without loading the engine and the HTTP stack.
    const { startServer } = await import("./server.js");
    const { ArtifactError } = await import("./config/artifact.js");
    try {
      server = await startServer(options, repository, { progressStream: process.stderr });
    } catch (err) {
      if (err instanceof ArtifactError) throw new ConfigError(err.message);
      throw err;
    }
  } catch (err) {
    if (err instanceof ConfigError || err instanceof ModelLoadError || err instanceof BackendUnavailableError) fail(err.message);
    fail(`cannot start: ${String((err as Error).message).split("\n")[0]}`);
  }
  process.stdout.write(`listening on ${server.url}\n`);
  if (options.apiKeys.length === 0 && options.apiKeysFile === undefined && !isLoopback(options.host)) {
    process.stderr.write(`spindle: warning: listening on ${options.host} with no API key: anyone who can reach it can use it (set --api-key)\n`);
  }

  let stopping = false;
  const shutdown = async (reason: string, code: number) => {
    // A second signal: the operator wants out now.
    if (stopping) process.exit(1);
    stopping = true;
    server.log.info(`${reason}: shutting down (grace ${options.shutdownGraceSeconds}s)`);
    await server.shutdown(options.shutdownGraceSeconds);
    process.exit(code);
  };
  process.on("SIGTERM", () => void shutdown("SIGTERM", 0));
  process.on("SIGINT", () => void shutdown("SIGINT", 0));
  // Logged with context; a rejection nobody handled does not stop the others' work.
  process.on("unhandledRejection", (reason) => server.log.error({ err: reason }, "unhandled promise rejection"));
  // After an exception nobody caught the process state is suspect: finish what runs, then exit 1.
  process.on("uncaughtException", (err) => {
    server.log.fatal({ err }, "uncaught exception");
    void shutdown("uncaught exception", 1);
  });
}

await main();
