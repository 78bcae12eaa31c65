#version 330
// One output frame in one pass (llvmpipe and small GPUs pay ~1 ms per extra full-screen
// pass at 720p, so the chain is fused here instead of ping-ponging buffers):
//   1. geometry effects move the sampling point   (kaleido, pixelate, rgbshift)
//   2. the layers are composited at that point    (composite.glsl)
//   3. colour effects                             (grade, vignette)
//   4. feedback mixes in the previous output      (trails)
// A stage that is off is compiled out (#ifdef NAME): a GPU skips a branch on a uniform
// for free, but llvmpipe runs every branch, so each combination is its own program.
// Transitions are a second pass (transitions/*.frag), only while one runs.
// Edit any of these files while running: the frame is rebuilt; a compile error keeps
// the last good program.

in vec2 uv;
out vec4 frag;
uniform vec2 u_resolution;
uniform float u_time;

#include "composite.glsl"
#include "fx/kaleido.glsl"
#include "fx/pixelate.glsl"
#include "fx/rgbshift.glsl"
#include "fx/grade.glsl"
#include "fx/vignette.glsl"
#include "feedback.glsl"

void main() {
    vec2 p = uv;
#ifdef KALEIDO
    p = fx_kaleido(p);
#endif
#ifdef PIXELATE
    p = fx_pixelate(p);
#endif
#ifdef RGBSHIFT
    vec2 d = fx_rgbshift_offset();
    vec3 c = vec3(composite(p + d).r, composite(p).g, composite(p - d).b);
#else
    vec3 c = composite(p);
#endif
#ifdef GRADE
    c = fx_grade(c);
#endif
#ifdef VIGNETTE
    c = fx_vignette(c, uv);
#endif
#ifdef FEEDBACK
    c = feedback(c, uv);
#endif
    frag = vec4(c, 1.0);
}
