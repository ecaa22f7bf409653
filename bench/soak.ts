/**
 * The soak run (not in CI): minutes of mixed traffic against a fresh server — normal
 * requests, streams cancelled mid-way, deadlines too short to meet, bursts beyond the
 * queue — then what was served, the errors by type, and RSS and heap at start and end
 * (from the server's own /metrics), so a leak shows as growth beyond noise.
 */
import { rng } from "./lib/load.js";
import { scrapeMetrics } from "./lib/server-metrics.js";
import { startSpindle } from "./lib/processes.js";

export interface SoakReport {
  minutes: number;
  served: number;
  errors: Record<string, number>;
  rssStartMiB: number;
  rssEndMiB: number;
  heapStartMiB: number;
  heapEndMiB: number;
  /** [minute, RSS MiB, heap MiB] every 30 s: growth that flattens is garbage, growth that does not is a leak. */
  samples: Array<[number, number, number]>;
}

export async function soak(opts: { modelPath: string; minutes: number; concurrency: number; threads: number }): Promise<SoakReport> {
  const server = await startSpindle({ modelPath: opts.modelPath, id: "m", parallel: 4, ctxSize: 1024, threads: opts.threads, extraArgs: ["--max-queue", "8"] });
  const errors: Record<string, number> = {};
  let served = 0;
  const count = (k: string) => (errors[k] = (errors[k] ?? 0) + 1);
  const mib = (m: Map<string, number> | undefined, k: string) => (m?.get(k) ?? NaN) / 2 ** 20;
  try {
    // Warm up, then take the baseline.
    for (let i = 0; i < 20; i++) await fetch(`${server.url}/v1/completions`, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ model: "m", prompt: "Once", max_tokens: 16 }) });
    const start = await scrapeMetrics(server.url);
    const t0 = Date.now();
    const end = t0 + opts.minutes * 60_000;
    const samples: Array<[number, number, number]> = [];
    const sampler = setInterval(async () => {
      const m = await scrapeMetrics(server.url);
      samples.push([Math.round((Date.now() - t0) / 6000) / 10, Math.round(mib(m, "spindle_process_resident_memory_bytes")), Math.round(mib(m, "spindle_process_heap_used_bytes"))]);
    }, 30_000);
    await Promise.all(
      Array.from({ length: opts.concurrency }, async (_, w) => {
        const rand = rng(1000 + w);
        while (Date.now() < end) {
          const kind = rand();
          const ac = new AbortController();
          const headers: Record<string, string> = { "content-type": "application/json" };
          const body: Record<string, unknown> = { model: "m", prompt: "Once upon a time", max_tokens: 16 + Math.floor(rand() * 200), stream: rand() < 0.5 };
          if (kind < 0.15) setTimeout(() => ac.abort(), 20 + rand() * 200); // cancelled mid-way
          else if (kind < 0.3) headers["x-request-timeout"] = "0.05"; // a deadline it cannot meet
          try {
            const res = await fetch(`${server.url}/v1/completions`, { method: "POST", headers, body: JSON.stringify(body), signal: ac.signal });
            const text = await res.text();
            if (res.status === 200 && !text.includes('"error"')) served++;
            else count(res.status === 200 ? "stream_error" : `http_${res.status}`);
            // A well-behaved client: refused means wait as told (capped, jittered).
            if (res.status === 429 || res.status === 503) {
              const after = Number(res.headers.get("retry-after") ?? 1);
              await new Promise((r) => setTimeout(r, Math.min(after, 2) * 1000 * (0.5 + rand())));
            }
          } catch {
            count("cancelled_by_client");
          }
        }
      }),
    );
    clearInterval(sampler);
    await new Promise((r) => setTimeout(r, 1000));
    const after = await scrapeMetrics(server.url);
    return {
      minutes: opts.minutes,
      served,
      errors,
      rssStartMiB: mib(start, "spindle_process_resident_memory_bytes"),
      rssEndMiB: mib(after, "spindle_process_resident_memory_bytes"),
      heapStartMiB: mib(start, "spindle_process_heap_used_bytes"),
      heapEndMiB: mib(after, "spindle_process_heap_used_bytes"),
      samples,
    };
  } finally {
    await server.stop();
  }
}
