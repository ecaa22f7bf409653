import { existsSync } from "node:fs";
import { resolve } from "node:path";
import { ArtifactError } from "./config/artifact.js";
import { ConfigError, helpText, parseCommandLine, type ServerOptions } from "./config/cli.js";
import { loadModelsFile, versionName, type ModelSpec } from "./config/models-file.js";
import { ModelLoadError } from "./engine/llama-engine.js";
import { startServer, type RunningServer } from "./server.js";

function fail(message: string): never {
  process.stderr.write(`spindle: ${message}\n`);
  process.exit(2);
}

function modelSpecs(options: ServerOptions): ModelSpec[] {
  if (options.models.length > 0) {
    return options.models.map((m) => ({
      id: m.id,
      version: versionName(undefined, undefined),
      path: resolve(m.path),
      sha256: undefined,
      sources: [],
      chatTemplate: undefined,
      ctxSize: undefined,
      parallel: undefined,
      sampling: {},
    }));
  }
  if (!options.configExplicit && !existsSync(options.configFile)) {
    throw new ConfigError(`no models to serve: ${options.configFile} not found (pass --config FILE or --model PATH)`);
  }
  return loadModelsFile(options.configFile);
}

async function main(): Promise<void> {
  let options: ServerOptions;
  let specs: ModelSpec[];
  try {
    const parsed = parseCommandLine(process.argv.slice(2));
    if (parsed.kind === "help") {
      process.stdout.write(`${helpText()}\n`);
      return;
    }
    options = parsed.options;
    specs = modelSpecs(options);
    for (const s of specs) {
      if (s.sources.length === 0 && !existsSync(s.path)) throw new ConfigError(`model "${s.id}": file not found: ${s.path}`);
    }
  } catch (err) {
    if (err instanceof ConfigError) fail(err.message);
    throw err;
  }

  let server: RunningServer;
  try {
    server = await startServer(options, specs, { progressStream: process.stderr });
  } catch (err) {
    if (err instanceof ModelLoadError || err instanceof ArtifactError) fail(err.message);
    fail(`cannot start: ${String((err as Error).message).split("\n")[0]}`);
  }
  process.stdout.write(`listening on ${server.url}\n`);

  let stopping = false;
  const shutdown = async (signal: string) => {
    // A second signal: the operator wants out now.
    if (stopping) process.exit(1);
    stopping = true;
    server.app.log.info(`${signal}: shutting down`);
    await server.close();
    process.exit(0);
  };
  process.on("SIGTERM", () => void shutdown("SIGTERM"));
  process.on("SIGINT", () => void shutdown("SIGINT"));
}

await main();
