//! Process memory housekeeping.

/// Hands the pages that the allocator kept after large frees back to the operating system.
///
/// glibc's malloc keeps freed heap memory for reuse, so after building a large index (hundreds
/// of MB of temporary graph and vector buffers) the process's RSS, which memory limits and the
/// memory alert see, stays as high as at the peak. Call it after such work, not per request: it
/// walks every arena. Does nothing where the allocator is not glibc's.
pub fn release_freed() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}
