// A bounded map that forgets what has not been used for a while, in two generations: reads
// and writes go to `recent`; when it fills, it becomes `older` and the previous `older` is
// dropped whole; an entry read from `older` moves back to `recent`. A hit in `recent`, nearly
// every lookup on the hot path, is one Map lookup, where reordering a single Map on every
// read (delete and re-insert) cost three and a rehash now and then (~2 µs a proxied request
// in the bench profile). It keeps at least the `max` most recently used entries, and at most
// 2 × max.
export class Lru<K, V> {
  readonly #max: number
  #recent = new Map<K, V>()
  #older = new Map<K, V>()

  constructor (max: number) {
    this.#max = max
  }

  get (key: K): V | undefined {
    const value = this.#recent.get(key)
    if (value !== undefined) return value
    const old = this.#older.get(key)
    if (old !== undefined) {
      this.#older.delete(key)
      this.#put(key, old)
    }
    return old
  }

  set (key: K, value: V): void {
    if (this.#recent.has(key)) {
      this.#recent.set(key, value)
      return
    }
    this.#older.delete(key)
    this.#put(key, value)
  }

  delete (key: K): void {
    this.#recent.delete(key)
    this.#older.delete(key)
  }

  clear (): void {
    this.#recent.clear()
    this.#older.clear()
  }

  get size (): number {
    return this.#recent.size + this.#older.size
  }

  #put (key: K, value: V): void {
    this.#recent.set(key, value)
    if (this.#recent.size >= this.#max) {
      this.#older = this.#recent
      this.#recent = new Map()
    }
  }
}
