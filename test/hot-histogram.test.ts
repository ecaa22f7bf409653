import { Histogram, Registry } from "prom-client";
import { describe, expect, it } from "vitest";
import fc from "fast-check";
import { HotHistogram } from "../src/telemetry/hot-histogram.js";

describe("HotHistogram", () => {
  it("scrapes exactly as prom-client's own histogram for the same observations", async () => {
    await fc.assert(
      fc.asyncProperty(fc.array(fc.double({ min: 0, max: 3, noNaN: true }), { maxLength: 200 }), async (values) => {
        const buckets = [0.001, 0.01, 0.1, 1, 2];
        const a = new Registry();
        const b = new Registry();
        const ref = new Histogram({ name: "x_seconds", help: "h", labelNames: ["model"], buckets, registers: [a] });
        const hot = new HotHistogram("x_seconds", "h", buckets, b).child({ model: "m" });
        for (const v of values) {
          ref.observe({ model: "m" }, v);
          hot.observe(v);
        }
        const norm = (t: string) => t.split("\n").filter((l) => !l.startsWith("#") && l !== "").map((l) => l.replace(/ (\S+)$/, (_, n) => ` ${Number(n).toFixed(9)}`));
        if (values.length > 0) expect(norm(await b.metrics())).toEqual(norm(await a.metrics()));
      }),
      { numRuns: 200 },
    );
  });
});
