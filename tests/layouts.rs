//! The image-column layouts give identical scores for identical pixels.

use crate::common::*;

#[test]
fn tensor_list_binary_and_png_layouts_score_identically() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (h, w) = (7, 5);
    let imgs = images(300, h, w, 11);
    let id = ids(0, 300);
    write_tensor_u8(&d.join("tensor.parquet"), &id, &imgs, &[h, w]);
    write_tensor_f32(&d.join("tensor_f32.parquet"), &id, &imgs, &[h, w]);
    write_list_u8(
        &d.join("list.parquet"),
        &id.iter().cloned().map(Some).collect::<Vec<_>>(),
        &imgs.iter().cloned().map(Some).collect::<Vec<_>>(),
    );
    write_binary_with_shape_columns(&d.join("binary.parquet"), &id, &imgs, h, w);
    let pngs: Vec<Vec<u8>> = imgs.iter().map(|i| png(i, h, w)).collect();
    write_png_struct(&d.join("png.parquet"), &id, &pngs);

    // 8-bit values, so any difference in decoded pixels changes the scores.
    let extra = "[model]\nkind = \"categorical\"\n\n[preprocess]\nbinarize = \"none\"\n";
    write_config(d, "fit.toml", "tensor.parquet", "out", extra);
    let model = fit_model(d, "fit.toml");

    let mut reference = None;
    for layout in ["tensor", "tensor_f32", "list", "binary", "png"] {
        let sink = format!("out-{layout}");
        let cfg = format!("{layout}.toml");
        write_config(d, &cfg, &format!("{layout}.parquet"), &sink, extra);
        let shape = format!("source.shape=[{h}, {w}]");
        let mut args = vec!["score", &cfg, "--model", &model, "--run-id", layout];
        // Only the list layout needs a shape; the others carry their own.
        if layout == "list" {
            args.extend(["--set", &shape]);
        }
        pipeline(d, &args, &[]).expect(0);
        let ll = likelihoods(&d.join(&sink).join("scores"));
        assert_eq!(ll.len(), 300, "{layout}");
        match &reference {
            None => reference = Some(ll),
            Some(r) => assert_eq!(&ll, r, "{layout} scores differ from the tensor layout's"),
        }
    }
}
