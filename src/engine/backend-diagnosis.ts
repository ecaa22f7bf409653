/**
 * Why a GPU backend cannot run on this machine, in one line an operator can act on.
 * node-llama-cpp only says "NoBinaryFoundError"; the usual causes are a prebuilt package
 * that was not installed (the CPU image, or --omit=optional) and shared libraries the
 * loader cannot find (the driver, the CUDA runtime and cuBLAS, the Vulkan loader), which
 * `ldd` on the backend's library names exactly.
 */
import { execFileSync } from "node:child_process";
import { existsSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";

/** What to do about each library the backends need that may be missing. */
const REMEDY: Record<string, string> = {
  "libcuda.so.1": "the NVIDIA driver (>= 580 for the CUDA 13 build) is not installed or not visible here: in a container, run it with the NVIDIA container toolkit (--gpus all, or a nvidia.com/gpu resource)",
  "libcudart.so.13": "install the CUDA 13 runtime (cuda-cudart-13-1) or use the CUDA image",
  "libcublas.so.13": "install cuBLAS 13 (libcublas-13-1) or use the CUDA image",
  "libcublasLt.so.13": "install cuBLAS 13 (libcublas-13-1) or use the CUDA image",
  "libvulkan.so.1": "install the Vulkan loader and a Vulkan driver (Debian: libvulkan1 mesa-vulkan-drivers)",
};

const BACKEND_NAME: Record<string, string> = { cuda: "CUDA", vulkan: "Vulkan", metal: "Metal" };

/** Libraries `ldd` reports as not found for `file`; undefined when ldd cannot tell. */
function missingLibraries(file: string): string[] | undefined {
  try {
    const out = execFileSync("ldd", [file], { encoding: "utf8", timeout: 10_000, stdio: ["ignore", "pipe", "ignore"] });
    return [...out.matchAll(/^\s*(\S+) => not found$/gm)].map((m) => m[1]!);
  } catch {
    return undefined;
  }
}

export function diagnoseBackend(gpu: "cuda" | "vulkan" | "metal", platform: NodeJS.Platform = process.platform, arch: string = process.arch): string {
  const name = BACKEND_NAME[gpu]!;
  const fallback = "or run on the CPU with --gpu cpu (or auto)";
  if (gpu === "metal") return platform === "darwin" ? `the Metal build did not load on this Mac; ${fallback}` : `Metal runs on macOS only; here use --gpu cuda or vulkan where there is such a device, ${fallback}`;
  if (platform !== "linux" && platform !== "win32") return `node-llama-cpp has no prebuilt ${name} build for ${platform}; ${fallback}`;
  const pkg = `@node-llama-cpp/${platform}-${arch}-${gpu}`;
  let root: string;
  try {
    // Its exports map hides package.json: resolve its entry and climb to the package root.
    root = dirname(createRequire(import.meta.url).resolve(pkg));
    while (!existsSync(join(root, "package.json")) && dirname(root) !== root) root = dirname(root);
  } catch {
    return `the ${name} build (${pkg}) is not installed here: this is a CPU-only install or image (use the ${name} image, or npm install without --omit=optional), ${fallback}`;
  }
  const lib = join(root, "bins", `${platform}-${arch}-${gpu}`, `libggml-${gpu}.so`);
  const missing = existsSync(lib) ? missingLibraries(lib) : undefined;
  if (missing && missing.length > 0) {
    const remedies = [...new Set(missing.map((l) => REMEDY[l] ?? `install the library that provides ${l}`))];
    return `the ${name} build cannot load: ${missing.join(", ")} not found (${remedies.join("; ")}), ${fallback}`;
  }
  return `the ${name} build loaded no usable device (is a ${name} GPU visible to this process?), ${fallback}`;
}
