// What a Linux x86-64 addon binary asks of the system that loads it, read from its ELF
// dynamic section: the libraries it needs, the symbol versions it needs (per symbol) and the
// symbols it exports. scripts/prebuild.mjs refuses to pack a binary that would not load on
// glibc 2.28 (NOTE: [portable binary] in native/portable/glibc_compat.cc), and
// test/portable-binary.test.ts checks the cmake-js build with it. No binutils needed.
import { readFileSync } from 'node:fs';

/** The oldest glibc the shipped binary must load on: Node 20's own floor. */
export const MAX_GLIBC = '2.28';
/** What the shipped binary exports: the N-API entry points, nothing else. */
export const ALLOWED_EXPORTS = ['napi_register_module_v1', 'node_api_module_get_api_version_v1'];

const SHT_DYNAMIC = 6;
const SHT_DYNSYM = 11;
const SHT_GNU_VERNEED = 0x6ffffffe;
const SHT_GNU_VERSYM = 0x6fffffff;
const DT_NEEDED = 1;

/**
 * @param {string} path an ELF64 little-endian shared object
 * @returns {{ needed: string[], versionNeeds: { file: string, version: string }[],
 *   imports: { name: string, version: string, weak: boolean }[], exports: string[] }}
 */
export function readElfNeeds(path) {
  const b = readFileSync(path);
  if (b.readUInt32BE(0) !== 0x7f454c46) throw new Error(`${path}: not an ELF file`);
  if (b[4] !== 2 || b[5] !== 1) throw new Error(`${path}: not a 64-bit little-endian ELF file`);
  const shoff = Number(b.readBigUInt64LE(0x28));
  const shentsize = b.readUInt16LE(0x3a);
  const shnum = b.readUInt16LE(0x3c);
  const sections = [];
  for (let i = 0; i < shnum; ++i) {
    const o = shoff + i * shentsize;
    sections.push({
      type: b.readUInt32LE(o + 4),
      offset: Number(b.readBigUInt64LE(o + 24)),
      size: Number(b.readBigUInt64LE(o + 32)),
      link: b.readUInt32LE(o + 40),
      info: b.readUInt32LE(o + 44),
    });
  }
  const str = (section, at) => {
    const start = sections[section.link].offset + at;
    return b.toString('latin1', start, b.indexOf(0, start));
  };
  const find = (type) => sections.find((s) => s.type === type);

  const needed = [];
  const dynamic = find(SHT_DYNAMIC);
  if (dynamic) {
    for (let o = dynamic.offset; o + 16 <= dynamic.offset + dynamic.size; o += 16) {
      const tag = Number(b.readBigInt64LE(o));
      if (tag === 0) break;
      if (tag === DT_NEEDED) needed.push(str(dynamic, Number(b.readBigUInt64LE(o + 8))));
    }
  }

  // Version index (vna_other) -> { file, version }.
  const byIndex = new Map();
  const verneed = find(SHT_GNU_VERNEED);
  if (verneed) {
    let o = verneed.offset;
    for (let n = 0; n < verneed.info; ++n) {
      const file = str(verneed, b.readUInt32LE(o + 4));
      let a = o + b.readUInt32LE(o + 8);
      for (let k = 0, count = b.readUInt16LE(o + 2); k < count; ++k) {
        byIndex.set(b.readUInt16LE(a + 6), { file, version: str(verneed, b.readUInt32LE(a + 8)) });
        a += b.readUInt32LE(a + 12);
      }
      const next = b.readUInt32LE(o + 12);
      if (next === 0) break;
      o += next;
    }
  }

  const imports = [];
  const exports = [];
  const dynsym = find(SHT_DYNSYM);
  const versym = find(SHT_GNU_VERSYM);
  if (dynsym) {
    for (let i = 1; i < dynsym.size / 24; ++i) {
      const o = dynsym.offset + i * 24;
      const name = str(dynsym, b.readUInt32LE(o));
      const bind = b[o + 4] >> 4;
      const visibility = b[o + 5] & 3;
      const shndx = b.readUInt16LE(o + 6);
      if (shndx === 0) {
        const index = versym ? b.readUInt16LE(versym.offset + 2 * i) & 0x7fff : 0;
        imports.push({ name, version: byIndex.get(index)?.version ?? '', weak: bind === 2 });
      } else if ((bind === 1 || bind === 2) && visibility === 0 && name !== '') {
        exports.push(name);
      }
    }
  }
  return { needed, versionNeeds: [...byIndex.values()], imports, exports };
}

function versionAbove(version, limit) {
  const a = version.split('.').map(Number);
  const b = limit.split('.').map(Number);
  for (let i = 0; i < Math.max(a.length, b.length); ++i) {
    if ((a[i] ?? 0) !== (b[i] ?? 0)) return (a[i] ?? 0) > (b[i] ?? 0);
  }
  return false;
}

/**
 * Why the binary at `path` would not load on every x86-64 Linux with glibc >= MAX_GLIBC, one
 * line per reason (empty: portable).
 */
export function portabilityProblems(path) {
  const { needed, versionNeeds, imports, exports } = readElfNeeds(path);
  const problems = [];
  const newer = imports.filter((s) => s.version.startsWith('GLIBC_') && versionAbove(s.version.slice(6), MAX_GLIBC));
  for (const s of newer) problems.push(`${s.name} needs ${s.version} (newer than glibc ${MAX_GLIBC})`);
  for (const lib of needed.filter((l) => /^libstdc\+\+/.test(l))) {
    problems.push(`needs ${lib} (the system's libstdc++ may be older than the build machine's)`);
  }
  for (const v of versionNeeds.filter((v) => /^(GLIBCXX|CXXABI)_/.test(v.version))) {
    problems.push(`needs ${v.version} of ${v.file}`);
  }
  const extra = exports.filter((name) => !ALLOWED_EXPORTS.includes(name));
  if (extra.length > 0) {
    problems.push(`exports ${extra.length} symbols besides the N-API entry points (e.g. ${extra.slice(0, 3).join(', ')})`);
  }
  return problems;
}
