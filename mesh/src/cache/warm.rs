//! The warm tier: prepared weights of recently loaded models kept in host RAM within a budget,
//! so that the next page-in of an evicted model is a copy from memory, not a disk read (and,
//! for Q4_1 GGUF files, not a widening to Q8_0 again).

use std::{
    path::{Path, PathBuf},
    time::SystemTime,
};

use flatmesh_runtime::Image;
use lru::LruCache;

/// What identifies the file an image was made from: if it changes, the image is stale.
type Stamp = Option<(SystemTime, u64)>;

fn stamp(path: &Path) -> Stamp {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

struct Warm {
    image: Image,
    path: PathBuf,
    stamp: Stamp,
}

/// Images by model id, least recently used first out, within a byte budget.
pub struct WarmTier {
    capacity: u64,
    used: u64,
    images: LruCache<String, Warm>,
}

impl WarmTier {
    pub fn new(capacity: u64) -> Self {
        WarmTier {
            capacity,
            used: 0,
            images: LruCache::unbounded(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.capacity > 0
    }

    pub fn used(&self) -> u64 {
        self.used
    }

    /// The models with an image here.
    pub fn ids(&self) -> Vec<String> {
        self.images.iter().map(|(id, _)| id.clone()).collect()
    }

    /// The image of `id` if it was made from `path` as it is now.
    pub fn get(&mut self, id: &str, path: &Path) -> Option<Image> {
        let fresh = self
            .images
            .peek(id)
            .is_some_and(|w| w.path == path && w.stamp.is_some() && w.stamp == stamp(path));
        if !fresh {
            self.remove(id);
            return None;
        }
        self.images.get(id).map(|w| w.image.clone())
    }

    /// Keep `image` of `id`, dropping the least recently used images to make room; an image
    /// larger than the whole tier is not kept.
    pub fn put(&mut self, id: &str, path: &Path, image: Image) {
        self.remove(id);
        if image.len() > self.capacity {
            return;
        }
        while self.used + image.len() > self.capacity {
            let Some((_, oldest)) = self.images.pop_lru() else {
                break;
            };
            self.used -= oldest.image.len();
        }
        self.used += image.len();
        let warm = Warm {
            image,
            path: path.to_path_buf(),
            stamp: stamp(path),
        };
        self.images.put(id.to_string(), warm);
    }

    pub fn remove(&mut self, id: &str) {
        if let Some(w) = self.images.pop(id) {
            self.used -= w.image.len();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use flatmesh_runtime::{Device, Format};
    use flatmesh_tests::fixtures::{write_llama_gguf, Size};

    use super::*;

    fn image(dir: &Path, id: &str) -> (PathBuf, Image) {
        let path = dir.join(format!("{id}.gguf"));
        write_llama_gguf(&path, Size::TINY, id.len() as u64).unwrap();
        let device = Device::host("host0", u64::MAX);
        let (_, image) =
            flatmesh_runtime::load_keeping_image(&path, Format::Gguf, &device, Default::default())
                .unwrap();
        (path, image.unwrap())
    }

    #[test]
    fn least_recently_used_images_leave_first_and_stale_ones_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let (pa, a) = image(dir.path(), "a");
        let (pb, b) = image(dir.path(), "bb");
        let (pc, c) = image(dir.path(), "ccc");
        let mut warm = WarmTier::new(a.len() + b.len() + c.len() / 2);
        warm.put("a", &pa, a.clone());
        warm.put("bb", &pb, b);
        assert!(
            warm.get("a", &pa).is_some(),
            "a is now the most recently used"
        );
        warm.put("ccc", &pc, c);
        assert!(
            warm.get("bb", &pb).is_none(),
            "bb was the least recently used"
        );
        assert!(warm.get("a", &pa).is_some() && warm.get("ccc", &pc).is_some());
        assert!(
            warm.get("a", &pb).is_none(),
            "another path is another image"
        );
        assert!(warm.get("a", &pa).is_none(), "and the stale entry is gone");
        write_llama_gguf(&pc, Size::TINY, 99).unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(&pc)
            .unwrap()
            .write_all(b"x")
            .unwrap();
        assert!(warm.get("ccc", &pc).is_none(), "the file changed");
        assert_eq!(warm.used(), 0);
        warm.put("a", &pa, a);
        assert!(warm.used() > 0);
    }
}
