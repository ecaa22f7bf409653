/**
 * The repository's routing and state on their own (no engine): names, canary buckets,
 * promotion history, the state file and its failure modes, immutability.
 */
import { chmodSync, existsSync, mkdtempSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { parseModelsFile } from "../src/config/models-file.js";
import { Repository } from "../src/models/repository.js";
import { StateFile } from "../src/models/repository-state.js";

const A = "a".repeat(64);
const B = "b".repeat(64);
const yaml = (shaV1 = A) => `models:
  - id: m
    default_version: v1
    versions:
      - { name: v1, file: one.gguf, sha256: ${shaV1} }
      - { name: v2, file: two.gguf, sha256: ${B} }
  - id: other
    file: other.gguf
aliases:
  stable: m@v1
`;
const config = (text = yaml()) => parseModelsFile(text, "/srv/models.yaml");
const quiet = () => {};
const tmp = () => mkdtempSync(join(tmpdir(), "spindle-repo-unit-"));

describe("repository routing", () => {
  it("resolves ids, aliases and exact versions; unknown names are 404s naming the model param", () => {
    const r = new Repository(config(), undefined, quiet);
    expect(r.route("m", undefined)).toMatchObject({ primary: { id: "m", version: "v1" }, via: "id" });
    expect(r.route("stable", undefined)).toMatchObject({ primary: { id: "m", version: "v1" }, via: "alias" });
    expect(r.route("m@v2", undefined)).toMatchObject({ primary: { id: "m", version: "v2" }, via: "exact" });
    expect(r.route("other", undefined)).toMatchObject({ primary: { id: "other", version: "unversioned" } });
    expect(() => r.route("nope", undefined)).toThrow(expect.objectContaining({ status: 404, param: "model" }));
    expect(() => r.route("m@v9", undefined)).toThrow(/no version 'v9' \(versions: v1, v2\)/);
  });

  it("a canary weight sends that share of users to the canary, each user always to the same side", () => {
    const r = new Repository(config(), undefined, quiet);
    r.setTraffic("m", "canary", { version: "v2", weight: 0.25 });
    let canary = 0;
    for (let i = 0; i < 10_000; i++) {
      const first = r.route("m", `user-${i}`);
      expect(r.route("m", `user-${i}`).primary.version).toBe(first.primary.version);
      if (first.via === "canary") canary++;
    }
    expect(canary / 10_000).toBeGreaterThan(0.23);
    expect(canary / 10_000).toBeLessThan(0.27);
    // Exact names and aliases are not subject to the canary.
    expect(r.route("m@v1", "user-1").primary.version).toBe("v1");
  });

  it("promotion keeps a history that rollback walks back; a model id serves only its own versions", () => {
    const r = new Repository(config(), undefined, quiet);
    expect(r.promote("m", r.promotionTarget("m", "v2"))).toMatchObject({ from: { version: "v1" }, to: { version: "v2" } });
    expect(r.current("m").version).toBe("v2");
    expect(r.rollback("m")).toMatchObject({ from: { version: "v2" }, to: { version: "v1" } });
    expect(() => r.rollbackTarget("m")).toThrow(expect.objectContaining({ status: 409, code: "no_history" }));
    expect(() => r.promotionTarget("m", "other@unversioned")).toThrow(expect.objectContaining({ status: 400 }));
    expect(() => r.promotionTarget("m", "v7")).toThrow(expect.objectContaining({ status: 404 }));
  });
});

describe("repository state", () => {
  it("operators' changes are saved atomically and win over the models file after a restart; the file's other defaults still apply", () => {
    const file = new StateFile(join(tmp(), "models.state.json"));
    const r = new Repository(config(), file, quiet);
    r.recordServed({ id: "m", version: "v1" });
    r.promote("stable", r.promotionTarget("stable", "m@v2"));
    r.setTraffic("m", "shadow", { version: "v2", weight: 0.5 });
    const saved = JSON.parse(readFileSync(file.path, "utf8"));
    // Only what an operator set is saved, plus the hashes each version was first seen with.
    expect(Object.keys(saved.pointers)).toEqual(["stable"]);
    expect(saved.artifacts["m@v1"]).toBe(A);
    const again = new Repository(config(yaml().replace("default_version: v1", "default_version: v2")), file, quiet);
    expect(again.route("stable", undefined).primary.version).toBe("v2");
    expect(again.trafficOf("m").shadow).toEqual({ version: "v2", weight: 0.5 });
    // The id's default was not operated on: the edited models file decides it.
    expect(again.current("m").version).toBe("v2");
  });

  it("a change whose state cannot be written is not made", () => {
    const dir = tmp();
    const file = new StateFile(join(dir, "no-such-dir", "state.json"));
    const r = new Repository(config(), undefined, quiet);
    // Swap in a state file that cannot be written, after construction.
    (r as unknown as { file: StateFile }).file = file;
    expect(() => r.promote("m", r.promotionTarget("m", "v2"))).toThrow(expect.objectContaining({ status: 500, code: "state_not_saved" }));
    expect(r.current("m").version).toBe("v1");
  });

  it("a corrupt state file stops the start with a clear message instead of being ignored", () => {
    const path = join(tmp(), "models.state.json");
    writeFileSync(path, "{ not json");
    expect(() => new Repository(config(), new StateFile(path), quiet)).toThrow(/not valid JSON/);
  });

  it("a served version whose hash changed is refused with the reason; the others are unaffected", () => {
    const file = new StateFile(join(tmp(), "models.state.json"));
    new Repository(config(), file, quiet).recordServed({ id: "m", version: "v1" });
    const changed = new Repository(config(yaml("c".repeat(64))), file, quiet);
    expect(changed.violations.get("m@v1")).toMatch(/immutable.*sha256 a{64}.*now gives c{64}/);
    expect(changed.violations.has("m@v2")).toBe(false);
  });

  it("a hash is recorded when the version is first served, not when the models file is read: a never-served version's hash may be corrected", () => {
    const file = new StateFile(join(tmp(), "models.state.json"));
    new Repository(config(), file, quiet);
    expect(existsSync(file.path)).toBe(false);
    const corrected = new Repository(config(yaml("c".repeat(64))), file, quiet);
    expect(corrected.violations.size).toBe(0);
    corrected.recordServed({ id: "m", version: "v1" });
    expect(JSON.parse(readFileSync(file.path, "utf8")).artifacts).toEqual({ "m@v1": "c".repeat(64) });
  });

  it("a read-only state file is never replaced: the change is refused and the file keeps its mode and bytes", () => {
    const file = new StateFile(join(tmp(), "models.state.json"));
    const r = new Repository(config(), file, quiet);
    r.recordServed({ id: "m", version: "v1" });
    chmodSync(file.path, 0o444);
    const before = readFileSync(file.path, "utf8");
    expect(() => r.promote("m", r.promotionTarget("m", "v2"))).toThrow(expect.objectContaining({ status: 500, code: "state_not_saved" }));
    expect(statSync(file.path).mode & 0o777).toBe(0o444);
    expect(readFileSync(file.path, "utf8")).toBe(before);
    expect(r.current("m").version).toBe("v1");
  });

  it("a writable state file keeps its mode across saves; temporary files left by a dead process are removed at start", () => {
    const dir = tmp();
    const file = new StateFile(join(dir, "models.state.json"));
    const r = new Repository(config(), file, quiet);
    r.recordServed({ id: "m", version: "v1" });
    chmodSync(file.path, 0o600);
    r.promote("m", r.promotionTarget("m", "v2"));
    expect(statSync(file.path).mode & 0o777).toBe(0o600);
    // pid 2^22+1 is above Linux's pid_max: no such process.
    const orphan = join(dir, `models.state.json.${2 ** 22 + 1}.tmp`);
    writeFileSync(orphan, "");
    const logs: string[] = [];
    new Repository(config(), file, (m) => logs.push(m));
    expect(existsSync(orphan)).toBe(false);
    expect(logs.join("\n")).toMatch(/removed models\.state\.json\.\d+\.tmp/);
  });
});

describe("operators' changes", () => {
  it("are compare-and-set on what was prepared: a pointer that moved meanwhile is a 409, not a silent overwrite", () => {
    const r = new Repository(config(), undefined, quiet);
    const v1 = { id: "m", version: "v1" };
    const v2 = { id: "m", version: "v2" };
    expect(() => r.promote("m", v2, v2)).toThrow(expect.objectContaining({ status: 409, code: "concurrent_change" }));
    r.promote("m", v2, v1);
    r.promote("stable", v2, v1);
    // Prepared while m served v1 with v1 in history: it has moved on.
    expect(() => r.rollback("m", { from: v1, to: v1 })).toThrow(expect.objectContaining({ status: 409 }));
    expect(r.rollback("m", { from: v2, to: v1 })).toMatchObject({ to: v1 });
  });

  it("name new aliases by the models file's rules: no '@' (which would shadow an exact version), no prototype keys, control or bidi characters", () => {
    const r = new Repository(config(), undefined, quiet);
    for (const bad of ["m@v2", "__proto__", "a\nb", "evil\u202etxt", "", "x".repeat(129), "-lead"]) {
      expect(() => r.promotionTarget(bad, "m@v1")).toThrow(expect.objectContaining({ status: 400, code: "invalid_name" }));
    }
    expect(r.promotionTarget("fresh-alias.1", "m@v1")).toEqual({ id: "m", version: "v1" });
  });
});
