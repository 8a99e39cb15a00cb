// Types of scripts/elf-needs.mjs, for the tests that import it.
export declare const MAX_GLIBC: string;
export declare const ALLOWED_EXPORTS: string[];
export interface ElfNeeds {
  needed: string[];
  versionNeeds: { file: string; version: string }[];
  imports: { name: string; version: string; weak: boolean }[];
  exports: string[];
}
export declare function readElfNeeds(path: string): ElfNeeds;
export declare function portabilityProblems(path: string): string[];
