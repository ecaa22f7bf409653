/**
 * The API keys file (--api-keys-file): one key per line, `#` comments. A key may carry
 * its tenant's settings after it, as name=value words:
 *
 *   sk-team-a-0123456789  name=team-a  models=stories,stable  concurrency=8  tpm=200000  priority=high  weight=2
 *
 * name     the label metrics and logs show (never the key itself); default key-<n>
 * models   model ids or aliases this key may use (comma-separated); default: all
 * concurrency, tpm   this key's own limits (override --key-max-concurrent, --key-tokens-per-minute)
 * priority  the class its requests get when they do not ask (high, normal, low); a key
 *           may ask for a lower class than its own, never a higher one
 * weight   its share of each model's slots when several keys wait (default 1)
 */
import { readFileSync } from "node:fs";
import { ConfigError } from "../errors.js";

export type PriorityClass = "high" | "normal" | "low";

export interface KeySpec {
  key: string;
  name: string | undefined;
  models: string[] | undefined;
  maxConcurrent: number | undefined;
  tokensPerMinute: number | undefined;
  priority: PriorityClass | undefined;
  weight: number | undefined;
}

const NAME = /^[A-Za-z0-9][A-Za-z0-9._\-]{0,63}$/;

export function plainKey(key: string): KeySpec {
  return { key, name: undefined, models: undefined, maxConcurrent: undefined, tokensPerMinute: undefined, priority: undefined, weight: undefined };
}

export function parseKeysFile(text: string, file: string): KeySpec[] {
  const out: KeySpec[] = [];
  const lines = text.split("\n");
  for (let i = 0; i < lines.length; i++) {
    const words = lines[i]!.replace(/#.*/, "").trim().split(/\s+/).filter((w) => w !== "");
    if (words.length === 0) continue;
    const where = `${file}:${i + 1}`;
    const spec = plainKey(words[0]!);
    if (spec.key.length < 8) throw new ConfigError(`${where}: keys must be at least 8 characters`);
    if (spec.key.includes("=")) throw new ConfigError(`${where}: the line must start with the key, then name=value settings`);
    for (const w of words.slice(1)) {
      const eq = w.indexOf("=");
      const field = eq > 0 ? w.slice(0, eq) : w;
      const value = eq > 0 ? w.slice(eq + 1) : "";
      const int = (min: number) => {
        if (!/^\d+$/.test(value) || Number(value) < min) throw new ConfigError(`${where}: ${field} must be an integer ≥ ${min}, got "${value}"`);
        return Number(value);
      };
      switch (field) {
        case "name":
          if (!NAME.test(value)) throw new ConfigError(`${where}: name must be letters, digits, '.', '_' or '-' (at most 64), got "${value}"`);
          spec.name = value;
          break;
        case "models":
          spec.models = value.split(",").filter((m) => m !== "");
          if (spec.models.length === 0) throw new ConfigError(`${where}: models needs at least one model id or alias`);
          break;
        case "concurrency":
          spec.maxConcurrent = int(1);
          break;
        case "tpm":
          spec.tokensPerMinute = int(1);
          break;
        case "priority":
          if (value !== "high" && value !== "normal" && value !== "low") throw new ConfigError(`${where}: priority must be high, normal or low, got "${value}"`);
          spec.priority = value;
          break;
        case "weight":
          spec.weight = int(1);
          break;
        default:
          throw new ConfigError(`${where}: unknown setting "${field}" (name, models, concurrency, tpm, priority, weight)`);
      }
    }
    out.push(spec);
  }
  return out;
}

export function readKeysFile(file: string): KeySpec[] {
  let text: string;
  try {
    text = readFileSync(file, "utf8");
  } catch (err) {
    throw new ConfigError(`--api-keys-file: cannot read ${file}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
  return parseKeysFile(text, file);
}
