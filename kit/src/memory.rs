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

/// Drops from this process's resident memory the pages of every shared mapping of a file under
/// `dir`, and returns the bytes of the mappings it advised.
///
/// Writing a large index through memory-mapped files leaves every page it wrote counted in the
/// process's RSS until the file is unmapped (a restart would drop them), although searches may
/// then read only part of them. `MADV_DONTNEED` on a shared file mapping only
/// unmaps the pages: their contents, written or not, stay in the page cache and reach the file
/// as always, and the next access maps them again. Private and anonymous mappings are never
/// touched, since there it would discard data.
///
/// # Safety
///
/// No thread may unmap or remap a file under `dir` while this runs: the mappings are read from
/// `/proc/self/maps` before they are advised, and a range unmapped in between and reused by an
/// anonymous mapping would lose its contents. Call it with the owner of those mappings stopped
/// (e.g. under its exclusive lock).
pub unsafe fn release_file_pages(dir: &std::path::Path) -> std::io::Result<u64> {
    #[cfg(target_os = "linux")]
    {
        // The kernel names mapped files by their resolved path.
        let dir = dir.canonicalize()?;
        let maps = std::fs::read_to_string("/proc/self/maps")?;
        let mut advised = 0;
        for (start, end) in shared_file_mappings(&maps, &dir) {
            // SAFETY: the range is a whole shared file mapping (the caller keeps it mapped), and
            // MADV_DONTNEED on such a mapping loses nothing. A failure (e.g. locked pages)
            // leaves the pages resident, which is harmless.
            let done = unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED)
            };
            if done == 0 {
                advised += (end - start) as u64;
            }
        }
        Ok(advised)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = dir;
        Ok(0)
    }
}

/// Address ranges of the shared mappings (`s` in the permissions) of files under `dir` in a
/// `/proc/PID/maps` listing.
#[cfg(target_os = "linux")]
fn shared_file_mappings(maps: &str, dir: &std::path::Path) -> Vec<(usize, usize)> {
    maps.lines()
        .filter_map(|line| {
            // "start-end perms offset dev inode   path": only the path contains a '/'.
            let mut fields = line.split_ascii_whitespace();
            let (range, perms) = (fields.next()?, fields.next()?);
            let path = std::path::Path::new(&line[line.find('/')?..]);
            if !perms.ends_with('s') || !path.starts_with(dir) {
                return None;
            }
            let (start, end) = range.split_once('-')?;
            let start = usize::from_str_radix(start, 16).ok()?;
            let end = usize::from_str_radix(end, 16).ok()?;
            (end > start).then_some((start, end))
        })
        .collect()
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    const LEN: usize = 8 << 20;

    /// Maps `path` (`LEN` bytes) shared or private, writable, and fills every page.
    fn map_and_fill(
        path: &std::path::Path,
        flags: libc::c_int,
        byte: u8,
    ) -> (usize, std::fs::File) {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .unwrap();
        file.set_len(LEN as u64).unwrap();
        // SAFETY: a fresh mapping of a file this test owns, unmapped by `unmap`.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
        // SAFETY: the mapping is LEN bytes, readable and writable.
        unsafe { std::ptr::write_bytes(addr as *mut u8, byte, LEN) };
        (addr as usize, file)
    }

    fn contents(addr: usize) -> &'static [u8] {
        // SAFETY: a live mapping of LEN bytes (until `unmap`).
        unsafe { std::slice::from_raw_parts(addr as *const u8, LEN) }
    }

    fn unmap(addr: usize) {
        // SAFETY: a mapping made by `map_and_fill`, no longer used.
        unsafe { libc::munmap(addr as *mut libc::c_void, LEN) };
    }

    /// Resident bytes of the mapping that starts at `addr`, from `/proc/self/smaps`.
    fn resident(addr: usize) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let start = format!("{addr:x}-");
        let mut lines = smaps.lines().skip_while(|l| !l.starts_with(&start));
        lines.next().expect("mapping listed");
        let rss = lines.find(|l| l.starts_with("Rss:")).unwrap();
        let kb: u64 = rss
            .split_ascii_whitespace()
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        kb * 1024
    }

    #[test]
    fn shared_file_pages_leave_the_rss_and_keep_their_contents() {
        let index = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        let (shared, _f1) = map_and_fill(&index.path().join("vectors"), libc::MAP_SHARED, 7);
        let (private, _f2) = map_and_fill(&index.path().join("private"), libc::MAP_PRIVATE, 9);
        let (other, _f3) = map_and_fill(&elsewhere.path().join("other"), libc::MAP_SHARED, 5);
        for addr in [shared, private, other] {
            assert!(
                resident(addr) >= LEN as u64 / 2,
                "filled pages are resident"
            );
        }

        // SAFETY: nothing else maps or unmaps files in these directories.
        let advised = unsafe { release_file_pages(index.path()) }.unwrap();

        assert_eq!(
            advised, LEN as u64,
            "only the shared mapping under the directory"
        );
        assert!(
            resident(shared) < LEN as u64 / 8,
            "{} bytes still resident",
            resident(shared)
        );
        assert!(
            resident(private) >= LEN as u64 / 2,
            "a private mapping is left alone"
        );
        assert!(
            resident(other) >= LEN as u64 / 2,
            "a mapping elsewhere is left alone"
        );
        // Nothing is lost: the pages come back from the page cache, private changes stay, and
        // the file holds what was written through the mapping.
        assert!(contents(shared).iter().all(|&b| b == 7));
        assert!(contents(private).iter().all(|&b| b == 9));
        let on_disk = std::fs::read(index.path().join("vectors")).unwrap();
        assert!(on_disk.len() == LEN && on_disk.iter().all(|&b| b == 7));
        for addr in [shared, private, other] {
            unmap(addr);
        }
    }

    #[test]
    fn maps_lines_are_parsed_by_permissions_and_path() {
        let maps = "\
7f0000000000-7f0000001000 rw-s 00000000 fd:01 12 /data/index/c1/matrix.dat
7f0000002000-7f0000003000 r--s 00000000 fd:01 13 /data/index/c1/old segment.dat (deleted)
7f0000004000-7f0000005000 rw-p 00000000 fd:01 14 /data/index/c1/private.dat
7f0000006000-7f0000007000 rw-s 00000000 fd:01 15 /data/indexes/c1/matrix.dat
7f0000008000-7f0000009000 rw-p 00000000 00:00 0 
7f000000a000-7f000000b000 rw-s 00000000 00:01 16 /SYSV00000000 (deleted)
";
        let found = shared_file_mappings(maps, std::path::Path::new("/data/index"));
        assert_eq!(
            found,
            vec![
                (0x7f0000000000, 0x7f0000001000),
                (0x7f0000002000, 0x7f0000003000)
            ]
        );
    }
}
