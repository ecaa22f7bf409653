/** Byte sizes as operators write them: "512MiB", "4GiB", "1.5GB", "800000000". */
import { ConfigError } from "../errors.js";

const UNITS: Record<string, number> = {
  "": 1,
  b: 1,
  k: 1e3,
  kb: 1e3,
  m: 1e6,
  mb: 1e6,
  g: 1e9,
  gb: 1e9,
  t: 1e12,
  tb: 1e12,
  kib: 2 ** 10,
  mib: 2 ** 20,
  gib: 2 ** 30,
  tib: 2 ** 40,
};

export function parseSize(flag: string, raw: string): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$/.exec(raw);
  const unit = m ? UNITS[m[2]!.toLowerCase()] : undefined;
  if (!m || unit === undefined) throw new ConfigError(`--${flag}: expected a size such as 800000000, 512MiB or 4GiB, got "${raw}"`);
  const bytes = Math.floor(Number(m[1]) * unit);
  if (bytes <= 0) throw new ConfigError(`--${flag}: must be more than 0 bytes, got "${raw}"`);
  return bytes;
}

export function formatBytes(n: number): string {
  if (!Number.isFinite(n)) return "unlimited";
  if (n < 2 ** 10) return `${n} B`;
  if (n < 2 ** 20) return `${(n / 2 ** 10).toFixed(1)} KiB`;
  if (n < 2 ** 30) return `${(n / 2 ** 20).toFixed(1)} MiB`;
  return `${(n / 2 ** 30).toFixed(2)} GiB`;
}
