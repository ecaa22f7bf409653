/** The stored-responses bounds: count, bytes, age, and ownership. Pure logic, no engine. */
import { describe, expect, it } from "vitest";
import { ResponseStore } from "../src/service/response-store.js";

const entry = (id: string, owner = 0, text = "x") => ({ id, owner, response: { id }, inputItems: [], conversation: [{ role: "user" as const, content: text }] });

describe("ResponseStore", () => {
  it("keeps the newest by count and by bytes, and refuses one larger than the whole store", () => {
    const byCount = new ResponseStore(2, 60_000);
    for (const id of ["a", "b", "c"]) byCount.put(entry(id));
    expect([byCount.get("a", 0), byCount.get("b", 0)?.id, byCount.get("c", 0)?.id]).toEqual([undefined, "b", "c"]);

    const byBytes = new ResponseStore(1000, 60_000, 10_000);
    for (let i = 0; i < 20; i++) byBytes.put(entry(`r${i}`, 0, "y".repeat(1500)));
    expect(byBytes.heldBytes).toBeLessThanOrEqual(10_000);
    expect(byBytes.get("r19", 0)).toBeDefined();
    expect(byBytes.get("r0", 0)).toBeUndefined();
    expect(byBytes.put(entry("huge", 0, "z".repeat(20_000)))).toBe(false);
    expect(byBytes.get("huge", 0)).toBeUndefined();
  });

  it("another owner is told it does not exist; delete frees its bytes; size 0 stores nothing", () => {
    const s = new ResponseStore(10, 60_000);
    s.put(entry("a", 1));
    expect(s.get("a", 2)).toBeUndefined();
    expect(s.delete("a", 2)).toBe(false);
    expect(s.delete("a", 1)).toBe(true);
    expect(s.heldBytes).toBe(0);
    const off = new ResponseStore(0, 60_000);
    expect(off.put(entry("a"))).toBe(false);
    expect(off.size).toBe(0);
  });

  it("expires by age", () => {
    const s = new ResponseStore(10, 0);
    s.put(entry("a"));
    const until = performance.now() + 2;
    while (performance.now() < until) {
      /* the clock moves past a zero TTL */
    }
    expect(s.get("a", 0)).toBeUndefined();
  });
});
