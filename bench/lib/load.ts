/** Load shapes: closed-loop concurrency and open-loop arrivals (Poisson or gamma). */

/** Runs `total` jobs with at most `concurrency` in flight; returns when all are done. */
export async function closedLoop<T>(concurrency: number, total: number, job: (i: number) => Promise<T>, onDone?: () => void): Promise<T[]> {
  const out: T[] = new Array(total);
  let next = 0;
  const worker = async () => {
    while (next < total) {
      const i = next++;
      out[i] = await job(i);
      onDone?.();
    }
  };
  await Promise.all(Array.from({ length: Math.min(concurrency, total) }, worker));
  return out;
}

/** A seeded PRNG (mulberry32), so workloads and arrivals repeat run to run. */
export function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Gamma(shape k, scale θ) by Marsaglia–Tsang; k < 1 boosted as usual. */
function gamma(rand: () => number, k: number, theta: number): number {
  if (k < 1) return gamma(rand, k + 1, theta) * Math.pow(rand(), 1 / k);
  const d = k - 1 / 3;
  const c = 1 / Math.sqrt(9 * d);
  for (;;) {
    let x: number;
    let v: number;
    do {
      // Box–Muller normal.
      x = Math.sqrt(-2 * Math.log(1 - rand())) * Math.cos(2 * Math.PI * rand());
      v = 1 + c * x;
    } while (v <= 0);
    v = v * v * v;
    const u = rand();
    if (u < 1 - 0.0331 * x ** 4 || Math.log(u) < 0.5 * x * x + d * (1 - v + Math.log(v))) return d * v * theta;
  }
}

/**
 * Inter-arrival gaps in seconds for `rate` requests/s, as vLLM draws them: gamma with
 * shape = burstiness and mean 1/rate (burstiness 1 is a Poisson process).
 */
export function arrivalGaps(n: number, rate: number, burstiness: number, seed: number): number[] {
  const rand = rng(seed);
  const theta = 1 / (rate * burstiness);
  return Array.from({ length: n }, () => gamma(rand, burstiness, theta));
}

/** Open loop: starts job i after the i-th arrival gap, never more than maxConcurrency at once. */
export async function openLoop<T>(gaps: number[], maxConcurrency: number, job: (i: number) => Promise<T>, onDone?: () => void): Promise<T[]> {
  const out: Promise<T>[] = [];
  let inFlight = 0;
  const waiters: Array<() => void> = [];
  for (let i = 0; i < gaps.length; i++) {
    await new Promise((r) => setTimeout(r, gaps[i]! * 1000));
    while (inFlight >= maxConcurrency) await new Promise<void>((r) => waiters.push(r));
    inFlight++;
    out.push(
      job(i).finally(() => {
        inFlight--;
        onDone?.();
        waiters.shift()?.();
      }),
    );
  }
  return Promise.all(out);
}
