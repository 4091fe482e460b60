// PhiedgeChat.kt: chat with a phiedge Phi bundle on Android through the ONNX Runtime GenAI Java API
// (package ai.onnxruntime.genai, onnxruntime-genai 0.14.x).
//
// Dependencies (app/build.gradle.kts). The GenAI AAR is not on Maven Central: download
// onnxruntime-genai-android-<version>.aar from the microsoft/onnxruntime-genai GitHub release and put it in
// app/libs/. ONNX Runtime itself comes from Maven Central (onnxruntime-genai 0.14.x needs ORT >= 1.26.0):
//     implementation(files("libs/onnxruntime-genai-android-0.14.0.aar"))
//     implementation("com.microsoft.onnxruntime:onnxruntime-android:1.26.0")
// A phiedge android-npu bundle (the Snapdragon NPU through QNN) needs ONNX Runtime's QNN build instead, and
// Qualcomm's QNN runtime libraries (the HTP backend), which Gradle puts in the APK's native libraries; their QNN
// version should match the ep_sdk_version of the bundle's *_ctx.onnx files (v2.51 for onnxruntime-qnn 2.7.0):
//     implementation("com.microsoft.onnxruntime:onnxruntime-android-qnn:1.26.0")
//     implementation("com.qualcomm.qti:qnn-runtime:2.51.0")
// Keep the model files uncompressed in the APK (AGP 7+):
//     android { androidResources { noCompress += listOf("onnx", "data", "bin") } }
// Google Play caps the size of APKs, app bundles and asset packs. A model of several GB may have to be
// downloaded on first run instead of shipped in assets/.
// Loading (the first time, copying GBs) and generating both block: never call chat() on the main
// thread (use e.g. Dispatchers.Default). onToken runs on that thread, so post UI updates yourself.
package ai.phiedge

import ai.onnxruntime.genai.Generator
import ai.onnxruntime.genai.GeneratorParams
import ai.onnxruntime.genai.Model
import ai.onnxruntime.genai.Tokenizer
import android.content.Context
import org.json.JSONArray
import org.json.JSONObject
import java.io.File
import java.io.IOException

/** One Phi model from app assets/[assetDir] (a flat folder). Run one chat at a time; close() when done. */
class PhiedgeChat(private val context: Context, private val assetDir: String = "phi") : AutoCloseable {
    private var model: Model? = null
    private var tokenizer: Tokenizer? = null
    private var staticShapes = false  // a static NPU model (phiedge's android-npu target)

    /**
     * Streams the reply to one user message. maxLength is the genai "max_length": prompt plus reply
     * tokens; for a static NPU model, whose KV cache has a fixed length, the number of reply tokens. The prompt
     * is framed with the model's own chat template (tokenizer_config.json); an NPU model takes one window of it
     * at most (genai_config.json's sliding_window.window_size, 64 tokens by default).
     */
    fun chat(prompt: String, maxLength: Int = 512, onToken: (String) -> Unit) {
        val (model, tokenizer) = load()
        val messages = JSONArray().put(JSONObject().put("role", "user").put("content", prompt)).toString()
        // templateStr "" selects the tokenizer's own template. Do not pass null: the JNI binding reads
        // templateStr without a null check (tools may be null).
        val framed = tokenizer.applyChatTemplate("", messages, null, true)
        tokenizer.encode(framed).use { sequences ->
            GeneratorParams(model).use { params ->
                if (!staticShapes) params.setSearchOption("max_length", maxLength.toDouble())
                Generator(model, params).use { generator ->
                    tokenizer.createStream().use { stream ->
                        generator.appendTokenSequences(sequences)
                        var count = 0
                        while (!generator.isDone() && (!staticShapes || count++ < maxLength)) {
                            generator.generateNextToken()
                            onToken(stream.decode(generator.getLastTokenInSequence(0)))
                        }
                    }
                }
            }
        }
    }

    @Synchronized
    private fun load(): Pair<Model, Tokenizer> {
        model?.let { return it to tokenizer!! }
        val dir = copyModelFromAssets()
        val config = JSONObject(File(dir, "genai_config.json").readText())
        val decoder = config.getJSONObject("model").getJSONObject("decoder")
        staticShapes = decoder.has("sliding_window")  // an NPU model: never set its max_length (genai aborts)
        val loaded = Model(dir.absolutePath)
        val tok = try { Tokenizer(loaded) } catch (e: Exception) { loaded.close(); throw e }
        model = loaded
        tokenizer = tok
        return loaded to tok
    }

    /** onnxruntime-genai needs real files: copy assets/<assetDir>/ to filesDir/<assetDir>/ once. */
    private fun copyModelFromAssets(): File {
        val dest = File(context.filesDir, assetDir).apply { mkdirs() }
        val names = context.assets.list(assetDir).orEmpty()
        if (names.isEmpty()) throw IOException("no files under assets/$assetDir/")
        for (name in names) {
            val path = "$assetDir/$name"
            val out = File(dest, name)
            // Works only for uncompressed assets (see noCompress above); -1 means "size unknown".
            val size = try { context.assets.openFd(path).use { it.length } } catch (e: IOException) { -1L }
            if (out.exists() && (size < 0 || out.length() == size)) continue // already copied
            val part = File(dest, "$name.part") // renamed when complete, so a partial copy never counts
            context.assets.open(path).use { input -> part.outputStream().use { input.copyTo(it, 1 shl 20) } }
            if (!part.renameTo(out)) throw IOException("cannot rename $part to $out")
        }
        return dest
    }

    @Synchronized
    override fun close() {
        tokenizer?.close(); tokenizer = null
        model?.close(); model = null
    }
}
