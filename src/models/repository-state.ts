/**
 * What operators change at run time — promotions, rollbacks, alias moves, canary and
 * shadow weights — and the hash each version was first seen with, so that a version's
 * artifact cannot silently change under its name. Kept in one JSON file beside
 * models.yaml, replaced atomically (write a temporary file, fsync, rename), so a crash
 * leaves either the old state or the new one, never half of each.
 */
import { closeSync, fchmodSync, fsyncSync, openSync, readdirSync, readFileSync, renameSync, statSync, unlinkSync, writeSync } from "node:fs";
import { basename, dirname, join } from "node:path";
import { z } from "zod";
import { ConfigError } from "../errors.js";

const refSchema = z.strictObject({ id: z.string(), version: z.string() });
const splitSchema = z.strictObject({ version: z.string(), weight: z.number().min(0).max(1) });

const stateSchema = z.strictObject({
  format: z.literal(1),
  /** Pointer name (a model id, or an alias) -> what it serves and what it served before. */
  pointers: z.record(z.string(), z.strictObject({ target: refSchema, history: z.array(refSchema) })),
  /** Model id -> traffic policy set by an operator (null: cleared on purpose). */
  traffic: z.record(z.string(), z.strictObject({ canary: splitSchema.nullable().optional(), shadow: splitSchema.nullable().optional() })),
  /** "id@version" -> sha256 it was first served with. */
  artifacts: z.record(z.string(), z.string()),
});

export type RepositoryState = z.infer<typeof stateSchema>;

export function emptyState(): RepositoryState {
  return { format: 1, pointers: {}, traffic: {}, artifacts: {} };
}

/** Temporary files this module writes: `<state file>.<pid>.tmp`. */
const TMP = /^(.*)\.(\d+)\.tmp$/;

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === "EPERM";
  }
}

export class StateFile {
  constructor(readonly path: string) {}

  /**
   * Removes the temporary files a crashed or killed process left beside the state file
   * (a kill -9 between write and rename, a disk that filled up). Returns what it removed.
   */
  cleanStale(): string[] {
    const dir = dirname(this.path);
    const removed: string[] = [];
    let names: string[];
    try {
      names = readdirSync(dir);
    } catch {
      return removed;
    }
    for (const name of names) {
      const m = TMP.exec(name);
      if (!m || m[1] !== basename(this.path)) continue;
      const pid = Number(m[2]);
      if (pid === process.pid || alive(pid)) continue;
      try {
        unlinkSync(join(dir, name));
        removed.push(name);
      } catch {
        /* another process got there first */
      }
    }
    return removed;
  }

  /** The saved state; an empty one when the file does not exist yet. A corrupt file is a start-up error, never ignored. */
  read(): RepositoryState {
    let text: string;
    try {
      text = readFileSync(this.path, "utf8");
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === "ENOENT") return emptyState();
      throw new ConfigError(`cannot read the repository state ${this.path}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
    }
    let doc: unknown;
    try {
      doc = JSON.parse(text);
    } catch {
      throw new ConfigError(`${this.path}: not valid JSON (fix or remove it: it holds promotions and canary weights)`);
    }
    const parsed = stateSchema.safeParse(doc);
    if (!parsed.success) throw new ConfigError(`${this.path}: ${parsed.error.issues[0]!.path.join(".")}: ${parsed.error.issues[0]!.message}`);
    return parsed.data;
  }

  /**
   * Replaces the file atomically (a temporary file, fsync, rename), keeping its mode. A
   * file its owner made read-only is not replaced: the write fails (EACCES), and the
   * change that needed it is refused. A failed write leaves no temporary file behind.
   */
  write(state: RepositoryState): void {
    let mode = 0o644;
    try {
      mode = statSync(this.path).mode & 0o7777;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "ENOENT") throw err;
    }
    if ((mode & 0o200) === 0) throw Object.assign(new Error(`${this.path} is read-only`), { code: "EACCES" });
    const tmp = `${this.path}.${process.pid}.tmp`;
    try {
      const fd = openSync(tmp, "w", mode);
      try {
        // The umask may have narrowed the mode given to open.
        fchmodSync(fd, mode);
        writeSync(fd, `${JSON.stringify(state, null, 2)}\n`);
        fsyncSync(fd);
      } finally {
        closeSync(fd);
      }
      renameSync(tmp, this.path);
    } catch (err) {
      try {
        unlinkSync(tmp);
      } catch {
        /* never created, or already renamed */
      }
      throw err;
    }
  }
}
