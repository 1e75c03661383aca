// A minimal typed-event emitter: on/off/once, listeners called synchronously in registration
// order. A listener that throws does not stop the others (the error is re-thrown asynchronously,
// so it still reaches the platform's error reporting).
export class Emitter {
  #listeners = new Map();

  on(event, listener) {
    let set = this.#listeners.get(event);
    if (!set) this.#listeners.set(event, (set = new Set()));
    set.add(listener);
    return () => this.off(event, listener);
  }

  off(event, listener) {
    this.#listeners.get(event)?.delete(listener);
  }

  once(event, listener) {
    const off = this.on(event, (value) => {
      off();
      listener(value);
    });
    return off;
  }

  emit(event, value) {
    const set = this.#listeners.get(event);
    if (!set) return;
    for (const listener of [...set]) {
      try {
        listener(value);
      } catch (err) {
        queueMicrotask(() => {
          throw err;
        });
      }
    }
  }
}
