// Removes node-llama-cpp's prebuilt engine binaries an image does not use: those of other
// platforms, and GPU backends not asked for. `npm ci` installs every optional binary
// package that matches the platform loosely (x64 images get the arm ones too), which is
// ~600 MB of CUDA and Vulkan builds in a CPU image.
//
//   node scripts/prune-engine-binaries.mjs [--keep cuda|vulkan]... [--dir node_modules]
//
// The CPU build of this platform is always kept (it is every backend's fallback).
// `--keep cuda` keeps the CUDA 13 build only, not its CUDA 12 fallback (`-cuda-ext`):
// an image brings the one CUDA runtime it was made for.
import { readdirSync, rmSync } from "node:fs";
import { join } from "node:path";
import { parseArgs } from "node:util";

const { values } = parseArgs({ options: { keep: { type: "string", multiple: true, default: [] }, dir: { type: "string", default: "node_modules" } } });
for (const b of values.keep) if (!["cuda", "vulkan"].includes(b)) throw new Error(`--keep: expected cuda or vulkan, got ${b}`);

const platform = { linux: "linux", darwin: "mac", win32: "win" }[process.platform] ?? process.platform;
const arch = process.arch === "arm" ? "armv7l" : process.arch;
const base = `${platform}-${arch}`;
const keep = new Set([base, ...values.keep.map((b) => `${base}-${b}`)]);

const root = join(values.dir, "@node-llama-cpp");
let removed = [];
for (const name of readdirSync(root)) {
  if (keep.has(name)) continue;
  rmSync(join(root, name), { recursive: true, force: true });
  removed.push(name);
}
console.log(`kept @node-llama-cpp/{${[...keep].join(",")}}; removed ${removed.length === 0 ? "nothing" : removed.join(", ")}`);
