/** Admission, deadlines, priority, prompt reuse and chunked prefill, through the real server and engine. */
import { afterEach, describe, expect, it } from "vitest";
import type { RunningServer } from "../src/server.js";
import { openaiClient, startTestServer, STORIES, waitFor, type TestServerOptions } from "./helpers/server.js";
import { postSse } from "./helpers/sse.js";
import { parseMetrics, sum } from "./helpers/prometheus.js";

let server: RunningServer | undefined;
afterEach(async () => {
  await server?.close();
  server = undefined;
});

async function start(opts: TestServerOptions & { ctx?: number }) {
  server = await startTestServer([{ ...STORIES, ctxSize: opts.ctx ?? 4096 }], { parallel: 1, ...opts });
  return server;
}

const scheduler = () => server!.registry.resolve("stories260K").scheduler;

function post(path: string, body: unknown, headers: Record<string, string> = {}, signal?: AbortSignal) {
  return fetch(`${server!.url}${path}`, {
    method: "POST",
    headers: { "content-type": "application/json", ...headers },
    body: JSON.stringify(body),
    signal,
  });
}

/** Occupies the only slot with a long generation until aborted. */
async function occupySlot(): Promise<AbortController> {
  const ac = new AbortController();
  const res = await post("/v1/completions", { model: "stories260K", prompt: "Once upon a time", max_tokens: 3500, ignore_eos: true, stream: true }, {}, ac.signal);
  const reader = res.body!.getReader();
  await reader.read();
  // Keep reading in the background so the stream flows until the abort.
  void (async () => {
    try {
      for (;;) if ((await reader.read()).done) break;
    } catch {
      /* aborted */
    }
  })();
  return ac;
}

const short = { model: "stories260K", prompt: "Once upon a time", max_tokens: 4, temperature: 0 };

describe("admission", () => {
  it("a full queue answers 429 overloaded with Retry-After; after it drains the next request succeeds", async () => {
    await start({ maxQueue: 1 });
    const a = await occupySlot();
    const queued = post("/v1/completions", short);
    await waitFor(() => scheduler().waiting === 1);
    const refused = await post("/v1/completions", short);
    expect(refused.status).toBe(429);
    expect(Number(refused.headers.get("retry-after"))).toBeGreaterThanOrEqual(1);
    const body = await refused.json();
    expect(body.error).toMatchObject({ type: "overloaded_error", code: "queue_full" });
    a.abort();
    expect((await queued).status).toBe(200);
    expect((await post("/v1/completions", short)).status).toBe(200);
  });

  it("the bound on queued prompt tokens refuses too", async () => {
    await start({ maxQueue: 10, maxQueuedTokens: 50 });
    const a = await occupySlot();
    const refused = await post("/v1/completions", { ...short, prompt: "word ".repeat(80) });
    expect(refused.status).toBe(429);
    expect((await refused.json()).error.code).toBe("queue_full");
    a.abort();
  });

  it("a request whose predicted wait exceeds its deadline is refused at once", async () => {
    await start({ maxQueue: 10 });
    // Build a measured drain rate: a few requests of known length.
    for (let i = 0; i < 3; i++) await post("/v1/completions", { ...short, max_tokens: 300, ignore_eos: true });
    const a = await occupySlot();
    const t0 = performance.now();
    const refused = await post("/v1/completions", short, { "X-Request-Timeout": "0.001" });
    expect(refused.status).toBe(429);
    expect((await refused.json()).error.code).toBe("deadline_unmeetable");
    expect(performance.now() - t0).toBeLessThan(500);
    a.abort();
  });
});

describe("deadlines", () => {
  it("a deadline that passes in the queue gets 504 with the envelope", async () => {
    await start({ maxQueue: 4 });
    const a = await occupySlot();
    const t0 = performance.now();
    const res = await post("/v1/completions", short, { "X-Request-Timeout": "0.3" });
    const waited = performance.now() - t0;
    expect(res.status).toBe(504);
    expect((await res.json()).error).toMatchObject({ type: "timeout", code: "queue_timeout" });
    expect(waited).toBeGreaterThanOrEqual(280);
    expect(waited).toBeLessThan(2000);
    expect(scheduler().waiting).toBe(0);
    a.abort();
  });

  it("a deadline mid-stream ends the stream with a timeout error event and frees the slot", async () => {
    await start({});
    const raw = await postSse(
      `${server!.url}/v1/chat/completions`,
      { model: "stories260K", messages: [{ role: "user", content: "Hi" }], max_tokens: 3500, ignore_eos: true, stream: true },
      { "X-Request-Timeout": "0.3" },
    );
    expect(raw.status).toBe(200);
    const last = JSON.parse(raw.events.at(-1)!);
    expect(last.error).toMatchObject({ type: "timeout", code: "generation_timeout" });
    expect(raw.events).not.toContain("[DONE]");
    expect(raw.events.length).toBeGreaterThan(2);
    await waitFor(() => scheduler().busySlots === 0, 1000, 1);
    // The OpenAI SDK raises that event as an error.
    const stream = await openaiClient(server!).chat.completions.create(
      { model: "stories260K", messages: [{ role: "user", content: "Hi" }], max_tokens: 3500, stream: true, ignore_eos: true } as never,
      { headers: { "X-Request-Timeout": "0.2" } },
    );
    await expect(
      (async () => {
        for await (const _ of stream as unknown as AsyncIterable<unknown>) {
          /* drain */
        }
      })(),
    ).rejects.toThrow(/deadline/);
  });

  it("a deadline mid-generation of a non-stream request gets 504", async () => {
    await start({});
    const res = await post("/v1/completions", { ...short, max_tokens: 3500, ignore_eos: true }, { "X-Request-Timeout": "0.2" });
    expect(res.status).toBe(504);
    expect((await res.json()).error.type).toBe("timeout");
    await waitFor(() => scheduler().busySlots === 0, 1000, 1);
  });

  it("without X-Request-Timeout, the OpenAI SDK's x-stainless-timeout header sets the deadline", async () => {
    await start({ maxQueue: 4 });
    const a = await occupySlot();
    // What the SDK sends for a 1 s client timeout (whole seconds).
    const res = await post("/v1/completions", short, { "x-stainless-timeout": "1" });
    expect(res.status).toBe(504);
    // X-Request-Timeout wins over it.
    const t0 = performance.now();
    const res2 = await post("/v1/completions", short, { "x-stainless-timeout": "30", "X-Request-Timeout": "0.2" });
    expect(res2.status).toBe(504);
    expect(performance.now() - t0).toBeLessThan(1500);
    a.abort();
  });
});

describe("priority", () => {
  it("X-Priority: high is admitted before normal before low", async () => {
    await start({ maxQueue: 10 });
    const a = await occupySlot();
    const order: string[] = [];
    const send = (p: string) => post("/v1/completions", short, { "X-Priority": p }).then(async (r) => {
      expect(r.status).toBe(200);
      await r.json();
      order.push(p);
    });
    const pending = [send("low")];
    await waitFor(() => scheduler().waiting === 1);
    pending.push(send("normal"));
    await waitFor(() => scheduler().waiting === 2);
    pending.push(send("high"));
    await waitFor(() => scheduler().waiting === 3);
    a.abort();
    await Promise.all(pending);
    expect(order).toEqual(["high", "normal", "low"]);
  });

  it("a bad X-Priority is a 400", async () => {
    await start({});
    const res = await post("/v1/completions", short, { "X-Priority": "urgent" });
    expect(res.status).toBe(400);
  });
});

describe("prompt reuse", () => {
  it("a repeated prompt reuses the slot's KV, reports cached tokens and gives identical greedy output", async () => {
    await start({ parallel: 2 });
    const client = openaiClient(server!);
    const messages = [{ role: "user" as const, content: "Once upon a time there was a little dog who liked to run in the park" }];
    const first = await client.chat.completions.create({ model: "stories260K", messages, max_tokens: 40, temperature: 0 });
    const second = await client.chat.completions.create({ model: "stories260K", messages, max_tokens: 40, temperature: 0 });
    expect(second.choices[0]!.message.content).toBe(first.choices[0]!.message.content);
    expect(second.usage!.prompt_tokens_details!.cached_tokens).toBe(second.usage!.prompt_tokens - 1);
    // A follow-up turn shares the whole first exchange as a prefix.
    const turn2 = await client.chat.completions.create({
      model: "stories260K",
      messages: [...messages, { role: "assistant", content: first.choices[0]!.message.content! }, { role: "user", content: "And then?" }],
      max_tokens: 10,
      temperature: 0,
    });
    expect(turn2.usage!.prompt_tokens_details!.cached_tokens).toBeGreaterThan(first.usage!.prompt_tokens);
  });
});

describe("chunked prefill", () => {
  it("a long prompt does not stall a running stream: its inter-token gaps stay far below the prefill time", async () => {
    await start({ parallel: 2, ctx: 4096 });
    // About 1,800 tokens: seven chunks of prefill.
    const long = { model: "stories260K", prompt: "the cat sat on the mat and ".repeat(180), max_tokens: 1, temperature: 0 };
    // How long the long prompt's prefill takes alone (a distinct prompt each time, so no reuse).
    const alone: number[] = [];
    for (const salt of ["a", "b"]) {
      const t0 = performance.now();
      const r = await post("/v1/completions", { ...long, prompt: salt + long.prompt });
      expect(r.status).toBe(200);
      alone.push(performance.now() - t0);
    }
    const prefillMs = Math.min(...alone);

    const ac = new AbortController();
    const res = await post("/v1/completions", { model: "stories260K", prompt: "Once upon a time", max_tokens: 4000, ignore_eos: true, stream: true }, {}, ac.signal);
    const reader = res.body!.getReader();
    const gaps: number[] = [];
    let last = performance.now();
    let prefilling = false;
    const done = post("/v1/completions", { ...long, prompt: "c" + long.prompt }).then(() => (prefilling = false));
    prefilling = true;
    while (prefilling) {
      await reader.read();
      const now = performance.now();
      gaps.push(now - last);
      last = now;
    }
    await done;
    ac.abort();
    const worst = Math.max(...gaps.slice(1));
    // Unchunked, one gap would be the whole prefill.
    expect(worst).toBeLessThan(prefillMs * 0.6);
  });
});

describe("requests arriving together at an idle model (--scheduler-delay-factor)", () => {
  /** Steps made slow on purpose (the fault hook), so a step is worth waiting a little for. */
  async function firstSteps(delayFactor: number): Promise<{ alone: number; steps: number }> {
    const faults = { failNextSteps: 0, slowStepMs: 0, failNextLoads: 0 };
    const s = await startTestServer([{ ...STORIES, parallel: 4 }], { schedulerDelayFactor: delayFactor }, { faults });
    try {
      const client = openaiClient(s);
      const steps = async () => {
        const m = parseMetrics(await (await fetch(`${s.url}/metrics`)).text());
        return { alone: sum(m, "spindle_decode_step_sequences_bucket", { le: "1" }), steps: sum(m, "spindle_decode_step_sequences_count") };
      };
      faults.slowStepMs = 25;
      // One request alone: the scheduler learns how long a step takes.
      await client.completions.create({ model: "stories260K", prompt: "Once", max_tokens: 3, temperature: 0 });
      // Two requests, 3 ms apart (at least), at the now idle model, twice: the first pair
      // shows that arrivals come in bursts; the second pair is counted.
      let before = await steps();
      for (let round = 0; round < 2; round++) {
        before = await steps();
        const done: Array<Promise<unknown>> = [];
        for (let i = 0; i < 2; i++) {
          done.push(client.completions.create({ model: "stories260K", prompt: "Once upon a time", max_tokens: 2, temperature: 0 }));
          await new Promise((r) => setTimeout(r, 3));
        }
        await Promise.all(done);
      }
      faults.slowStepMs = 0;
      const after = await steps();
      return { alone: after.alone - before.alone, steps: after.steps - before.steps };
    } finally {
      await s.close();
    }
  }

  it("they share their first step instead of the first one stepping alone", async () => {
    // 0.2 × a 25 ms step, capped at 5 ms: both arrive within the wait.
    expect(await firstSteps(0.2)).toEqual({ alone: 0, steps: 2 });
    // Without the wait the first steps alone, and the others catch up a step later.
    expect((await firstSteps(0)).alone).toBeGreaterThanOrEqual(1);
  }, 30_000);
});

describe("clients that come back a few milliseconds after their streams end (the hold for returning clients)", () => {
  /**
   * Two closed-loop clients, as a benchmark's or an agent's: each sends its next request
   * as soon as its last one ended, for `learn` rounds; then one of them 8 ms later (beyond
   * the 5 ms that the wait at an idle model allows). Steps are made slow on purpose (400 ms,
   * the fault hook), so that a step is worth holding a few milliseconds for, even where CI's
   * other test files slow the clients' returns to tens of milliseconds (a hold needs them
   * back within a quarter of a step). Counts the steps carrying one sequence in the last
   * `counted` rounds.
   *
   * The slow step delays each step's results with the JavaScript thread free, as a real
   * step in a job does, so each return is seen when it comes. (It was once a busy wait on
   * that thread: a client that missed a hold was then seen only after the next step, too
   * late to count as a return, so one miss on a loaded CI machine taught the scheduler
   * that clients do not come back, and it stopped holding: 17 lone steps against 20.)
   */
  async function loneSteps(delayFactor: number, learn = 4, rounds = 12, counted = 6): Promise<number> {
    const faults = { failNextSteps: 0, slowStepMs: 0, failNextLoads: 0 };
    const s = await startTestServer([{ ...STORIES, parallel: 4 }], { schedulerDelayFactor: delayFactor }, { faults });
    try {
      const client = openaiClient(s);
      const alone = async () => sum(parseMetrics(await (await fetch(`${s.url}/metrics`)).text()), "spindle_decode_step_sequences_bucket", { le: "1" });
      faults.slowStepMs = 400;
      let before = 0;
      const clientLoop = async (i: number, pauseMs: number) => {
        for (let round = 0; round < rounds; round++) {
          if (i === 0 && round === rounds - counted) before = await alone();
          await client.completions.create({ model: "stories260K", prompt: "Once upon a time", max_tokens: 3, temperature: 0 });
          if (round >= learn - 1 && pauseMs > 0) await new Promise((r) => setTimeout(r, pauseMs));
        }
      };
      await Promise.all([clientLoop(0, 0), clientLoop(1, 8)]);
      faults.slowStepMs = 0;
      return (await alone()) - before;
    } finally {
      await s.close();
    }
  }

  it("once learned, the scheduler holds the next step for them and they share it; without, each round has steps alone", async () => {
    const held = await loneSteps(0.1);
    // Without (delay factor 0): the first back starts alone and ends a step before the other,
    // which then steps alone: two lone steps a round.
    const unheld = await loneSteps(0);
    expect(unheld).toBeGreaterThanOrEqual(6);
    // Held: both share the steps of the counted rounds. A client later than the hold on a
    // loaded machine (CI runs other test files beside this one) costs a round its two lone
    // steps; most rounds must be shared.
    expect(held).toBeLessThanOrEqual(unheld / 3);
  }, 150_000);
});
