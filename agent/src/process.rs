//! The agent's own process: how its allocator gives memory back, and its CPU time.

/// Keeps large buffers out of the heap: glibc raises its mmap threshold each time a large
/// block is freed (up to 32 MiB), after which the per-tick buffers of a busy interval
/// (100k entries) land in the heap and stay there. Fixed thresholds: blocks of 128 KiB
/// and more are mapped and unmapped on their own, and free heap above 1 MiB at the top
/// is returned.
pub fn tune_allocator() {
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1024 * 1024);
    }
}

/// Returns freed heap memory to the kernel (glibc keeps freed blocks for reuse otherwise;
/// after a burst such as loading, that is memory the agent never needs again).
pub fn release_free_heap() {
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::malloc_trim(0);
    }
}

/// CPU time the calling thread has used (CLOCK_THREAD_CPUTIME_ID).
pub fn thread_cpu_time() -> std::time::Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}
