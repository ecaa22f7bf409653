// The process entry (`npm start`). CommonJS on purpose: it loads with synchronous file
// reads, so it runs before anything has started libuv's thread pool, whose size can
// only be set before first use (see src/config/threadpool.ts for why it matters).
"use strict";
const { availableParallelism } = require("node:os");

if (process.env.UV_THREADPOOL_SIZE === undefined) {
  const at = process.argv.indexOf("--threads");
  const requested = Number(at !== -1 ? process.argv[at + 1] : process.env.SPINDLE_THREADS);
  const cores = availableParallelism();
  const compute = Number.isInteger(requested) && requested > 0 ? requested : Math.max(1, cores - 1);
  // The cores left after the compute threads and the JavaScript thread; 1 to 4.
  process.env.UV_THREADPOOL_SIZE = String(Math.max(1, Math.min(4, cores - compute - 1)));
}

(async () => {
  const { register } = await import("tsx/esm/api");
  register();
  await import("./main.ts");
})().catch((err) => {
  process.stderr.write(`spindle: ${err?.stack ?? err}\n`);
  process.exit(1);
});
