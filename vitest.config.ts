import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    testTimeout: 120_000,
    hookTimeout: 120_000,
    // Native addon + worker_threads: separate processes keep a crash from hiding other results.
    pool: 'forks',
  },
});
