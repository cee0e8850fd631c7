"""Small cross-cutting helpers (atomic writes, seeding). May import nothing else from modalseg but errors."""
