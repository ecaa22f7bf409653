/** Starts the servers a benchmark compares, as child processes, and waits until they serve. */
import { spawn, type ChildProcess } from "node:child_process";
import { createServer } from "node:net";
import { resolve } from "node:path";

export const ROOT = resolve(import.meta.dirname, "../..");

export interface ServerProcess {
  name: string;
  url: string;
  child: ChildProcess;
  stop(): Promise<void>;
}

export async function freePort(): Promise<number> {
  return new Promise((res, rej) => {
    const s = createServer();
    s.listen(0, "127.0.0.1", () => {
      const a = s.address();
      s.close(() => (typeof a === "object" && a ? res(a.port) : rej(new Error("no port"))));
    });
  });
}

function stopper(child: ChildProcess): () => Promise<void> {
  return () =>
    new Promise((r) => {
      if (child.exitCode !== null) return r();
      child.once("exit", () => r());
      child.kill("SIGTERM");
      setTimeout(() => child.kill("SIGKILL"), 5000).unref();
    });
}

async function waitHealthy(url: string, child: ChildProcess, name: string, path: string): Promise<void> {
  const deadline = Date.now() + 120_000;
  while (Date.now() < deadline) {
    if (child.exitCode !== null) throw new Error(`${name} exited with ${child.exitCode}`);
    try {
      const res = await fetch(`${url}${path}`);
      if (res.status === 200) return;
    } catch {
      /* not up yet */
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`${name} did not become ready`);
}

export async function startSpindle(opts: { modelPath: string; id: string; parallel: number; ctxSize: number; threads: number; extraArgs?: string[] }): Promise<ServerProcess> {
  return startSpindleWith(["--model", `${opts.modelPath}=${opts.id}`, "--parallel", String(opts.parallel), "--ctx-size", String(opts.ctxSize), "--threads", String(opts.threads), "--max-queue", "1024", ...(opts.extraArgs ?? [])]);
}

/** This server with any arguments (a models file, a budget...), on a free port, once ready. */
export async function startSpindleWith(extraArgs: string[]): Promise<ServerProcess> {
  const port = await freePort();
  const args = ["dist/launch.cjs", "--port", String(port), "--log-level", "warn", ...extraArgs];
  const child = spawn(process.execPath, args, { cwd: ROOT, stdio: ["ignore", "ignore", "inherit"] });
  const url = `http://127.0.0.1:${port}`;
  await waitHealthy(url, child, "spindle", "/readyz");
  return { name: "spindle", url, child, stop: stopper(child) };
}

/** llama.cpp's own server with the same model, slots, context per slot and threads. */
export async function startLlamaServer(opts: { binary: string; modelPath: string; id: string; parallel: number; ctxSize: number; threads: number; extraArgs?: string[] }): Promise<ServerProcess> {
  const port = await freePort();
  const args = ["-m", opts.modelPath, "--alias", opts.id, "--host", "127.0.0.1", "--port", String(port), "-np", String(opts.parallel), "-c", String(opts.ctxSize * opts.parallel), "-t", String(opts.threads), "-tb", String(opts.threads), "--no-webui", "--log-disable", ...(opts.extraArgs ?? [])];
  const child = spawn(opts.binary, args, { stdio: ["ignore", "ignore", "ignore"] });
  const url = `http://127.0.0.1:${port}`;
  await waitHealthy(url, child, "llama-server", "/health");
  return { name: "llama-server", url, child, stop: stopper(child) };
}
