//! DeepPCB files: list lines `groupX/X/ID.jpg groupX/X_not/ID.txt`, annotation lines
//! `x1 y1 x2 y2 type` (or comma separated), detection lines `x1,y1,x2,y2,confidence,type`.

use std::path::{Path, PathBuf};

use crate::aoi::detections::{DEFECT_CLASSES, Detection};

/// One pair of the list with its paths resolved under the data root.
#[derive(Debug, Clone, PartialEq)]
pub struct PairEntry {
    pub id: String,
    pub test: PathBuf,
    pub template: PathBuf,
    pub annotation: PathBuf,
}

/// A box with its DeepPCB class (1..=6) and, for detections, a confidence.
#[derive(Debug, Clone, PartialEq)]
pub struct LabeledBox {
    pub bbox: [f64; 4],
    pub class_index: usize,
    pub confidence: f64,
}

/// Image files a list line may name (the pair's files share its extension).
const IMAGE_EXTENSIONS: [&str; 6] = ["jpg", "jpeg", "png", "bmp", "tif", "tiff"];

pub fn read_list(list: &Path, root: &Path) -> anyhow::Result<Vec<PairEntry>> {
    let text = std::fs::read_to_string(list)
        .map_err(|e| anyhow::anyhow!("cannot read list {}: {e}", list.display()))?;
    let mut entries: Vec<PairEntry> = Vec::new();
    // Line of each id: detections are written per id, so an id listed twice would be one file.
    let mut lines_of_ids = std::collections::HashMap::new();
    // A byte-order mark (some editors write one) is not part of the first path.
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    for (number, line) in text.lines().enumerate() {
        // `#` starts a comment, on its own line or after a pair.
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let mut fields = line.split_whitespace();
        let (Some(image), Some(annotation), None) = (fields.next(), fields.next(), fields.next())
        else {
            anyhow::bail!(
                "{}:{}: expected `groupX/X/ID.jpg groupX/X_not/ID.txt`, got {line:?}",
                list.display(),
                number + 1
            );
        };
        let image = Path::new(image);
        let stem = image.file_stem().and_then(|s| s.to_str()).ok_or_else(|| {
            anyhow::anyhow!("{}:{}: no image id in {line:?}", list.display(), number + 1)
        })?;
        let annotation_is_text = Path::new(annotation)
            .extension()
            .is_some_and(|e| e == "txt");
        let extension = image
            .extension()
            .and_then(|e| e.to_str())
            .filter(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
            .filter(|_| annotation_is_text)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "{}:{}: expected `groupX/X/ID.jpg groupX/X_not/ID.txt` (image: {}; \
                     annotation: .txt), got {line:?}",
                    list.display(),
                    number + 1,
                    IMAGE_EXTENSIONS.join(", ")
                )
            })?;
        // The annotation is the pair's own: ID.txt of the same id.
        if Path::new(annotation).file_stem().and_then(|s| s.to_str()) != Some(stem) {
            anyhow::bail!(
                "{}:{}: the annotation {annotation} is not pair {stem}'s (expected {stem}.txt)",
                list.display(),
                number + 1
            );
        }
        if let Some(first) = lines_of_ids.insert(stem.to_string(), number + 1) {
            anyhow::bail!(
                "{}:{}: pair {stem} is already listed on line {first} (its detections are one \
                 file, ID.txt)",
                list.display(),
                number + 1
            );
        }
        let folder = root.join(image.parent().unwrap_or(Path::new("")));
        entries.push(PairEntry {
            id: stem.to_string(),
            test: folder.join(format!("{stem}_test.{extension}")),
            template: folder.join(format!("{stem}_temp.{extension}")),
            annotation: root.join(annotation),
        });
    }
    anyhow::ensure!(
        !entries.is_empty(),
        "{} lists no pairs (lines `groupX/X/ID.jpg groupX/X_not/ID.txt`)",
        list.display()
    );
    Ok(entries)
}

/// Ground truth: `x1 y1 x2 y2 type`, whitespace or comma separated.
pub fn read_annotations(path: &Path) -> anyhow::Result<Vec<LabeledBox>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read annotation {}: {e}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(number, line)| {
            let values = parse_numbers(line)
                .filter(|v| v.len() == 5)
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "{}:{}: expected `x1 y1 x2 y2 type`, got {line:?}",
                        path.display(),
                        number + 1
                    )
                })?;
            Ok(LabeledBox {
                bbox: [values[0], values[1], values[2], values[3]],
                class_index: class_index(values[4], path, number)?,
                confidence: 1.0,
            })
        })
        .collect()
}

/// Detections: `x1,y1,x2,y2,confidence,type` with type a class name or number.
pub fn read_detections(path: &Path) -> anyhow::Result<Vec<LabeledBox>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read detections {}: {e}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(number, line)| {
            let fields: Vec<&str> = line.split(',').map(str::trim).collect();
            let bad = || {
                anyhow::anyhow!(
                    "{}:{}: expected `x1,y1,x2,y2,confidence,type`, got {line:?}",
                    path.display(),
                    number + 1
                )
            };
            if fields.len() != 6 {
                return Err(bad());
            }
            let numbers: Vec<f64> = fields[..5]
                .iter()
                .map(|f| f.parse::<f64>())
                .collect::<Result<_, _>>()
                .map_err(|_| bad())?;
            let [x1, y1, x2, y2, confidence] = numbers[..] else {
                unreachable!("five numbers were parsed")
            };
            let refuse = |problem: &str| {
                anyhow::anyhow!("{}:{}: {problem}, got {line:?}", path.display(), number + 1)
            };
            if !(0.0..=1.0).contains(&confidence) {
                return Err(refuse("the confidence must be within 0..1"));
            }
            if !numbers.iter().all(|v| v.is_finite()) || x2 < x1 || y2 < y1 {
                return Err(refuse("the box must be finite with x1 <= x2 and y1 <= y2"));
            }
            let class_index = match DEFECT_CLASSES.iter().position(|c| *c == fields[5]) {
                Some(i) => i + 1,
                None => {
                    let number_given = fields[5].parse::<f64>().map_err(|_| {
                        refuse(&format!(
                            "type {:?} is not a class name ({}) or number (1..6)",
                            fields[5],
                            DEFECT_CLASSES.join(", ")
                        ))
                    })?;
                    class_index(number_given, path, number)?
                }
            };
            Ok(LabeledBox {
                bbox: [x1, y1, x2, y2],
                class_index,
                confidence,
            })
        })
        .collect()
}

pub fn format_detections(detections: &[Detection]) -> String {
    detections
        .iter()
        .map(|d| {
            format!(
                "{},{},{},{},{:.6},{}\n",
                d.bbox[0], d.bbox[1], d.bbox[2], d.bbox[3], d.confidence, d.class_name
            )
        })
        .collect()
}

fn parse_numbers(line: &str) -> Option<Vec<f64>> {
    line.split(|c: char| c == ',' || c.is_whitespace())
        .filter(|f| !f.is_empty())
        .map(|f| f.parse::<f64>().ok())
        .collect()
}

fn class_index(value: f64, path: &Path, line: usize) -> anyhow::Result<usize> {
    let index = value as usize;
    if value.fract() != 0.0 || !(1..=6).contains(&index) {
        anyhow::bail!("{}:{}: type {value} is not 1..6", path.display(), line + 1);
    }
    Ok(index)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_resolves_pair_paths() {
        let dir = tempfile::tempdir().unwrap();
        let list = dir.path().join("list.txt");
        std::fs::write(&list, "group1/1/1000.jpg group1/1_not/1000.txt\n\n").unwrap();
        let entries = read_list(&list, Path::new("/data")).unwrap();
        assert_eq!(
            entries,
            vec![PairEntry {
                id: "1000".into(),
                test: "/data/group1/1/1000_test.jpg".into(),
                template: "/data/group1/1/1000_temp.jpg".into(),
                annotation: "/data/group1/1_not/1000.txt".into(),
            }]
        );
        // Comments, a byte-order mark and CRLF are skipped; an empty list, an id listed twice
        // and an annotation of another id are refused.
        std::fs::write(
            &list,
            "\u{feff}# held-out pairs\r\ngroup1/1/1000.jpg group1/1_not/1000.txt  # first\r\n",
        )
        .unwrap();
        assert_eq!(read_list(&list, Path::new("/data")).unwrap(), entries);
        std::fs::write(&list, "\n# nothing\n").unwrap();
        let error = read_list(&list, Path::new("/d")).unwrap_err().to_string();
        assert!(error.contains("lists no pairs"), "{error}");
        for bad in [
            "only-one-field\n",
            "garbage line\n",
            "group1/1/1000.jpg group1/1_not/1000.jpg\n",
            "group2/2/1.png group2/2_not/1.txt\n",
            "group2/2/2.png group2/2_not/3.txt\n",
        ] {
            std::fs::write(&list, format!("group1/1/1.png group1/1_not/1.txt\n{bad}")).unwrap();
            let error = read_list(&list, Path::new("/d")).unwrap_err().to_string();
            assert!(error.contains("list.txt:2"), "{bad}: {error}");
        }
    }

    #[test]
    fn annotations_and_detections_parse_both_separators() {
        let dir = tempfile::tempdir().unwrap();
        let ann = dir.path().join("a.txt");
        std::fs::write(&ann, "1 2 30 40 3\n5,6,70,80,6\n").unwrap();
        let boxes = read_annotations(&ann).unwrap();
        assert_eq!(boxes[1].bbox, [5.0, 6.0, 70.0, 80.0]);
        assert_eq!(boxes[0].class_index, 3);
        std::fs::write(&ann, "1 2 30 40 9\n").unwrap();
        assert!(read_annotations(&ann).is_err());

        let det = dir.path().join("d.txt");
        std::fs::write(&det, "1,2,3,4,0.9,short\n5,6,7,8,0.5,6\n").unwrap();
        let found = read_detections(&det).unwrap();
        assert_eq!((found[0].class_index, found[1].class_index), (2, 6));
        assert_eq!(found[0].confidence, 0.9);
        for (bad, problem) in [
            ("1,2,3,4,NaN,short", "confidence"),
            ("1,2,3,4,-0.5,short", "confidence"),
            ("5,5,1,1,0.9,short", "x1 <= x2"),
            ("1,2,inf,4,0.9,short", "finite"),
            (
                "1,2,3,4,0.9,pinhole",
                "mousebite, spur, copper, pin-hole) or number",
            ),
        ] {
            std::fs::write(&det, format!("1,2,3,4,0.9,short\n{bad}\n")).unwrap();
            let error = read_detections(&det).unwrap_err().to_string();
            assert!(
                error.contains("d.txt:2") && error.contains(problem),
                "{bad}: {error}"
            );
        }
    }
}
