// The process entry (`npm start` runs its build, dist/launch.cjs). CommonJS on purpose:
// it runs before anything has started libuv's thread pool, whose size can only be set
// before first use. node-llama-cpp runs every decode step and sampling call on that
// pool, and surplus pool threads fight the compute threads for the cores.
import { availableParallelism } from "node:os";

if (process.env.UV_THREADPOOL_SIZE === undefined) {
  const at = process.argv.indexOf("--threads");
  const requested = Number(at !== -1 ? process.argv[at + 1] : process.env.SPINDLE_THREADS);
  const cores = availableParallelism();
  const compute = Number.isInteger(requested) && requested > 0 ? requested : Math.max(1, cores - 1);
  // The cores left after the compute threads and the JavaScript thread; 1 to 4.
  process.env.UV_THREADPOOL_SIZE = String(Math.max(1, Math.min(4, cores - compute - 1)));
}

import("./main.js").catch((err: unknown) => {
  process.stderr.write(`spindle: ${(err as Error)?.stack ?? String(err)}\n`);
  process.exit(1);
});
